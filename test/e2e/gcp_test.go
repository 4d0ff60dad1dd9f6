package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/ephemeral-secrets/csi-driver/test/gcptest"
	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/kube"
	"github.com/ephemeral-secrets/csi-driver/test/kubelet"
)

const (
	gcpAudience = "//iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/esc/providers/kube"
	gcpSA       = "app-reader@proj-a.iam.gserviceaccount.com"
)

// gcpEnv is one test's Google stand-in, the kube-apiserver whose
// service-account tokens its workload identity provider trusts, and a
// driver configured for it.
type gcpEnv struct {
	*fixture
	google *gcptest.Server
	api    *kube.Cluster
}

var (
	apiServerOnce sync.Once
	apiServer     *kube.Cluster
	apiServerErr  error
)

// startAPIServer starts etcd and kube-apiserver once for the suite: the
// service-account issuer whose tokens pods hand the driver, and whose
// discovery document and JWKS the Google stand-in validates them with.
func startAPIServer(t *testing.T) *kube.Cluster {
	t.Helper()
	apiServerOnce.Do(func() {
		if apiServer, apiServerErr = kube.Start(); apiServerErr != nil {
			return
		}
		for _, l := range apiServer.LogFiles {
			harness.RegisterLog(l)
		}
	})
	if apiServerErr != nil {
		t.Fatal(apiServerErr)
	}
	return apiServer
}

// setupGCP starts the Google stand-in trusting the suite's
// kube-apiserver, and a driver whose gcp section lets team-a/app
// impersonate gcpSA for lifetime seconds; extra flags follow.
func setupGCP(t *testing.T, lifetime int, extra ...string) *gcpEnv {
	t.Helper()
	c := startAPIServer(t)
	g := gcptest.Start(t, gcptest.Options{Issuer: c.Issuer, OIDCClient: gcptest.OIDCClient(c.CAPEM, kube.AdminToken), Audience: gcpAudience})
	// Every token the stand-in issued, renewals included, is looked for
	// in the suite's logs.
	t.Cleanup(func() {
		for _, tok := range g.Issued() {
			harness.RememberSecret(tok)
		}
	})
	g.AllowImpersonation(gcpSA, g.Principal("team-a", "app"))
	classes := `apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: gcp-agent
  namespace: team-a
spec:
  provider: gcp
  parameters:
    accessTokenJSONFile: token.json
    secrets: |
      - resourceName: projects/proj-a/secrets/api-key/versions/latest
        path: api-key
        mode: 0644
      - resourceName: projects/proj-a/secrets/db/versions/1
        fileName: db-password
        extractJSONKey: password
        mode: 0400
---
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: gcp-denied
  namespace: team-a
spec:
  provider: gcp
  parameters:
    secrets: |
      - resourceName: projects/proj-a/secrets/payroll/versions/latest
        path: payroll
---
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: gcp-other-endpoint
  namespace: team-a
spec:
  provider: gcp
  parameters:
    secretManagerEndpoint: https://secretmanager.evil.example
    secrets: |
      - resourceName: projects/proj-a/secrets/api-key/versions/latest
        path: api-key
`
	backends := fmt.Sprintf(`gcp:
  audience: %[1]s
  stsEndpoint: %[2]s
  iamCredentialsEndpoint: %[2]s
  secretManagerEndpoint: %[2]s
  projects: [proj-a]
  serviceAccounts:
    team-a/app: [%[3]s]
  tokenLifetimeSeconds: %[4]d
  tls:
    %[2]s: {caCert: %[5]s}
`, gcpAudience, g.URL, gcpSA, lifetime, g.CAFile)
	return &gcpEnv{fixture: startFixture(t, classes, backends, extra...), google: g, api: c}
}

// put adds a version of a secret of proj-a that gcpSA may read.
func (e *gcpEnv) put(name, value string) {
	harness.RememberSecret(value)
	full := "projects/proj-a/secrets/" + name
	e.google.GrantAccess(full, gcptest.ServiceAccountPrincipal(gcpSA))
	e.google.AddVersion(full, []byte(value))
}

// pod is pod name of team-a/sa, made in the kube-apiserver, with the
// service-account token kubelet would ask it for: bound to the pod, for
// the workload identity provider.
func (e *gcpEnv) pod(t *testing.T, name, sa string) kubelet.Pod {
	t.Helper()
	return e.podFor(t, name, sa, "https:"+gcpAudience)
}

// podFor is pod with a token for audience instead.
func (e *gcpEnv) podFor(t *testing.T, name, sa, audience string) kubelet.Pod {
	t.Helper()
	p := kubelet.NewPod("team-a", name, sa)
	tok, uid, err := gcptest.PodToken(context.Background(), e.api.Config(), "team-a", sa, name, audience)
	if err != nil {
		t.Fatal(err)
	}
	harness.RememberSecret(tok)
	p.UID = uid
	p.Tokens = map[string]string{"https:" + gcpAudience: tok}
	return p
}

// tokenInfo calls the stand-in's authenticated endpoint with token, as
// the pod would, and returns who the token is.
func (e *gcpEnv) tokenInfo(t *testing.T, token string) (map[string]string, int) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, e.google.URL+"/tokeninfo", nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := e.google.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var info map[string]string
	_ = json.NewDecoder(resp.Body).Decode(&info)
	return info, resp.StatusCode
}

// calls are the stand-in's calls of STS, IAM Credentials and Secret
// Manager so far.
func (e *gcpEnv) calls() [3]int {
	return [3]int{e.google.Calls(gcptest.STS), e.google.Calls(gcptest.IAM), e.google.Calls(gcptest.Access)}
}

func TestGCPTokenAndSecretsReachThePodAndRepublishReadsNothing(t *testing.T) {
	ctx := context.Background()
	e := setupGCP(t, 600)
	e.put("api-key", "gcp-api-key-v1")
	e.put("db", `{"user":"app","password":"gcp-db-password"}`)
	pod := e.pod(t, "gcp-agent", "app")
	target, err := e.kube.Publish(ctx, pod, dbVolume("gcp-agent"))
	if err != nil {
		t.Fatalf("publish: %v", err)
	}
	for name, want := range map[string]string{"api-key": "gcp-api-key-v1", "db-password": "gcp-db-password"} {
		if got := readSecret(t, target, name); got != want {
			t.Errorf("%s = %q, want %q", name, got, want)
		}
	}
	// The class's modes, write bits dropped; the default for the rest.
	for name, want := range map[string]os.FileMode{"api-key": 0o444, "db-password": 0o400, "access-token": 0o440} {
		st, err := os.Stat(filepath.Join(target, name))
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != want {
			t.Errorf("%s: mode %v, want %v", name, st.Mode().Perm(), want)
		}
	}
	tok := readSecret(t, target, "access-token")
	info, code := e.tokenInfo(t, tok)
	if code != http.StatusOK || info["email"] != gcpSA {
		t.Errorf("the pod's token at tokeninfo: HTTP %d %v, want the service account %s", code, info, gcpSA)
	}
	var doc struct {
		AccessToken string    `json:"access_token"`
		Expiry      time.Time `json:"expiry"`
	}
	b, err := os.ReadFile(filepath.Join(target, "token.json"))
	if err != nil || json.Unmarshal(b, &doc) != nil || doc.AccessToken != tok || time.Until(doc.Expiry) > 10*time.Minute || time.Until(doc.Expiry) < 5*time.Minute {
		t.Errorf("token.json: %v, token match %v, expiry %v (want the admin's 10 minutes)", err, doc.AccessToken == tok, doc.Expiry)
	}
	// One exchange, one impersonation, one read per secret.
	if got, want := e.calls(), [3]int{1, 1, 2}; got != want {
		t.Errorf("calls (STS, IAM, Secret Manager) after publish %v, want %v", got, want)
	}
	// kubelet's republish (every 60-90 s in a cluster) reads nothing again.
	before := e.calls()
	for range 3 {
		if _, err := e.kube.Publish(ctx, pod, dbVolume("gcp-agent")); err != nil {
			t.Fatalf("republish: %v", err)
		}
	}
	if got := e.calls(); got != before {
		t.Errorf("republish called the backend: %v, before %v", got, before)
	}
	if got := readSecret(t, target, "access-token"); got != tok {
		t.Error("republish replaced the token")
	}
	if err := e.kube.Unpublish(ctx, pod, "db"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(target); !os.IsNotExist(err) {
		t.Errorf("files left after unpublish: %v", err)
	}
	harness.Eventually(t, 10*time.Second, "the audit says the token lives until it expires", func() (bool, error) {
		return strings.Contains(strings.Join(auditRecords(t, e.audit), " "), "revoke/unrevocable"), nil
	})

	// A secret the service account may not read; a class naming an
	// endpoint off the admin's list (refused before any call).
	for class, code := range map[string]codes.Code{"gcp-denied": codes.PermissionDenied, "gcp-other-endpoint": codes.InvalidArgument} {
		before := e.calls()
		_, err := e.kube.Publish(ctx, e.pod(t, class, "app"), dbVolume(class))
		if status.Code(err) != code {
			t.Errorf("%s: %v, want %s", class, err, code)
		}
		if after := e.calls(); class == "gcp-other-endpoint" && after != before {
			t.Errorf("%s: the stand-in had calls %v, before %v", class, after, before)
		}
	}
	// A pod of a service account the admin maps to nothing gets a
	// federated token, which the secrets do not grant.
	if _, err := e.kube.Publish(ctx, e.pod(t, "gcp-unmapped", "other"), dbVolume("gcp-agent")); status.Code(err) != codes.PermissionDenied {
		t.Errorf("unmapped service account: %v, want PermissionDenied", err)
	}
	// A token for another audience is refused by STS.
	other := e.podFor(t, "gcp-wrong-aud", "app", "vault")
	if _, err := e.kube.Publish(ctx, other, dbVolume("gcp-agent")); status.Code(err) != codes.PermissionDenied {
		t.Errorf("a token for another audience: %v, want PermissionDenied", err)
	}
	// A value whose checksum does not match is not written.
	e.google.CorruptChecksums(true)
	if _, err := e.kube.Publish(ctx, e.pod(t, "gcp-corrupt", "app"), dbVolume("gcp-agent")); status.Code(err) != codes.Unavailable {
		t.Errorf("corrupt checksum: %v, want Unavailable", err)
	}
	e.google.CorruptChecksums(false)
}

func TestGCPTokenIsRenewedBeforeExpiryAndNotAfterUnpublish(t *testing.T) {
	ctx := context.Background()
	// A 60 s token (the shortest the admin may set) renewed at 5 % of its
	// life: replaced every 3 s.
	e := setupGCP(t, 60, "--renew-fraction", "0.05")
	e.put("api-key", "gcp-api-key-v1")
	e.put("db", `{"password":"gcp-db-password"}`)
	pod := e.pod(t, "gcp-renewed", "app")
	target, err := e.kube.Publish(ctx, pod, dbVolume("gcp-agent"))
	if err != nil {
		t.Fatalf("publish: %v", err)
	}
	first := readSecret(t, target, "access-token")
	var next string
	harness.Eventually(t, 30*time.Second, "the token replaced before it expires", func() (bool, error) {
		next = readSecret(t, target, "access-token")
		return next != first, nil
	})
	if info, code := e.tokenInfo(t, next); code != http.StatusOK || info["email"] != gcpSA {
		t.Errorf("the renewed token at tokeninfo: HTTP %d %v", code, info)
	}
	// Each renewal reads the alias (latest) again, which finds a new
	// version; the pinned version (db, versions/1) is read once only.
	e.put("api-key", "gcp-api-key-v2")
	harness.Eventually(t, 30*time.Second, "three more renewals, the alias's new value in place", func() (bool, error) {
		return e.google.Calls(gcptest.STS) >= 5 && readSecret(t, target, "api-key") == "gcp-api-key-v2", nil
	})
	if got := readSecret(t, target, "db-password"); got != "gcp-db-password" {
		t.Errorf("db-password after renewals = %q", got)
	}
	if err := e.kube.Unpublish(ctx, pod, "db"); err != nil {
		t.Fatal(err)
	}
	after := e.calls()
	// One exchange per issue; per issue one read of the alias, and one of
	// the pinned version in all.
	if after[2] != after[0]+1 {
		t.Errorf("calls (STS, IAM, Secret Manager) over %d issues: %v; want %d versions.access (the alias at each, the pinned version once)",
			after[0], after, after[0]+1)
	}
	time.Sleep(10 * time.Second) // three renewal periods
	if got := e.calls(); got != after {
		t.Errorf("calls after unpublish: %v, at unpublish %v: renewal did not stop", got, after)
	}
}

// TestGCPBackendCallsFail makes each call to Google (STS, IAM
// Credentials, Secret Manager) fail at publish and at renewal in each way
// a call fails: refused (UNAVAILABLE), timed out (no answer until the
// driver's backend timeout), and done but unanswered (the stand-in mints
// or reads, then drops the connection). A publish fails Unavailable
// (kubelet retries) leaving nothing; a renewal fails, the pod keeps its
// token meanwhile, and the retry replaces it. Revocation makes no call
// (Google revokes nothing), so there is nothing to fail there.
func TestGCPBackendCallsFail(t *testing.T) {
	ctx := context.Background()
	e := setupGCP(t, 60, "--renew-fraction", "0.05", "--backend-timeout", "1s")
	e.put("api-key", "gcp-api-key-v1")
	e.put("db", `{"password":"gcp-db-password"}`)
	kinds := []struct {
		name   string
		inject func(service string)
	}{
		{"refused", func(s string) { e.google.Fail(s, 1, http.StatusServiceUnavailable, 0) }},
		{"timed-out", func(s string) { e.google.Fail(s, 1, http.StatusServiceUnavailable, time.Minute) }},
		// A read (Secret Manager's GET) is idempotent: net/http sends it
		// again when a reused connection drops it unanswered, on each idle
		// connection (at most 2) and then a new one; its reply is lost on
		// all of them.
		{"lost-reply", func(s string) { e.google.Lose(s, 3) }},
	}
	disarm := func(s string) { e.google.Lose(s, 0) }
	renewErrors := func() int {
		n := 0
		for _, r := range auditRecords(t, e.audit) {
			if r == "renew/error" {
				n++
			}
		}
		return n
	}
	i := 0
	for _, service := range []string{gcptest.STS, gcptest.IAM, gcptest.Access} {
		for _, k := range kinds {
			t.Run(service+"/"+k.name, func(t *testing.T) {
				i++
				pod := e.pod(t, fmt.Sprintf("gcp-fault-%d", i), "app")
				k.inject(service)
				if _, err := e.kube.Publish(ctx, pod, dbVolume("gcp-agent")); status.Code(err) != codes.Unavailable {
					t.Fatalf("publish: %v, want Unavailable", err)
				}
				disarm(service)
				if _, err := os.Stat(e.kube.TargetPath(pod, "db")); !os.IsNotExist(err) {
					t.Errorf("a failed publish left its target: %v", err)
				}
				// kubelet retries.
				target, err := e.kube.Publish(ctx, pod, dbVolume("gcp-agent"))
				if err != nil {
					t.Fatalf("the retried publish: %v", err)
				}
				tok := readSecret(t, target, "access-token")
				if got := readSecret(t, target, "api-key"); got != "gcp-api-key-v1" {
					t.Errorf("api-key = %q", got)
				}
				// The next renewal's call fails; the pod keeps a token that
				// works until the retry replaces it.
				errs := renewErrors()
				k.inject(service)
				harness.Eventually(t, 30*time.Second, "a renewal failed", func() (bool, error) { return renewErrors() > errs, nil })
				disarm(service)
				if _, code := e.tokenInfo(t, readSecret(t, target, "access-token")); code != http.StatusOK {
					t.Errorf("after the failed renewal the pod's token gets HTTP %d", code)
				}
				harness.Eventually(t, 30*time.Second, "the retry replaced the token", func() (bool, error) {
					return readSecret(t, target, "access-token") != tok && renewErrors() > errs, nil
				})
				if err := e.kube.Unpublish(ctx, pod, "db"); err != nil {
					t.Fatal(err)
				}
			})
		}
	}
}
