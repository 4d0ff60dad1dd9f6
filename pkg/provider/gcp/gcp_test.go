package gcp

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/test/gcptest"
	"github.com/ephemeral-secrets/csi-driver/test/kube"
	"github.com/ephemeral-secrets/csi-driver/test/standin"
)

const (
	testAudience = "//iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/esc/providers/kube"
	gsa          = "app-reader@proj-a.iam.gserviceaccount.com"
)

var cluster *kube.Cluster

func TestMain(m *testing.M) { gcptest.Main(m, &cluster) }

// env is a stand-in for Google and a provider whose admin trusts it.
type env struct {
	s *gcptest.Server
	p *Provider
	// secrets are every value the stand-in holds, and errs every error
	// the provider returned: neither may show up where it must not.
	values []string
	errs   []error
}

func newEnv(t *testing.T, mutate func(*Config)) *env {
	t.Helper()
	s := gcptest.Start(t, gcptest.Options{Issuer: cluster.Issuer, OIDCClient: gcptest.OIDCClient(cluster.CAPEM, kube.AdminToken), Audience: testAudience})
	cfg := Config{
		Audience: testAudience, STSEndpoint: s.URL, IAMCredentialsEndpoint: s.URL, SecretManagerEndpoint: s.URL,
		Projects: []string{"proj-a"}, ServiceAccounts: map[string][]string{"team-a/app": {gsa}},
		TLS: map[string]provider.TLS{s.URL: {CACert: s.CAFile}},
	}
	if mutate != nil {
		mutate(&cfg)
	}
	p, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	// Google's side of the admin's mapping: the pod's principal may
	// impersonate the service account.
	s.AllowImpersonation(gsa, s.Principal("team-a", "app"))
	return &env{s: s, p: p}
}

// put adds a version of a secret of proj-a readable by principals.
func (e *env) put(name, value string, principals ...string) int {
	e.values = append(e.values, value)
	full := "projects/proj-a/secrets/" + name
	for _, p := range principals {
		e.s.GrantAccess(full, p)
	}
	return e.s.AddVersion(full, []byte(value))
}

// request is a publish of pod p1 of ns/sa, with its real token.
func (e *env) request(t *testing.T, ns, sa string, params map[string]string) provider.Request {
	t.Helper()
	tok, uid, err := gcptest.PodToken(context.Background(), cluster.Config(), ns, sa, "p1-"+sa, "https:"+testAudience)
	if err != nil {
		t.Fatal(err)
	}
	return provider.Request{LeaseID: "l1", VolumeID: "v1", Class: ns + "/c", Params: params,
		Pod:    provider.Pod{Namespace: ns, Name: "p1-" + sa, UID: uid, ServiceAccount: sa},
		Tokens: map[string]provider.Token{"https:" + testAudience: {Token: tok, ExpiresAt: time.Now().Add(time.Hour)}}}
}

func (e *env) issue(ctx context.Context, req provider.Request) (provider.Lease, error) {
	l, err := e.p.Issue(ctx, req)
	if err != nil {
		e.errs = append(e.errs, err)
	}
	return l, err
}

// noSecretsIn fails if any error the provider returned quotes a token
// the stand-in issued, the pod's token or a secret value.
func (e *env) noSecretsIn(t *testing.T, req provider.Request) {
	t.Helper()
	secrets := append(e.s.Issued(), e.values...)
	for _, tok := range req.Tokens {
		secrets = append(secrets, tok.Token)
	}
	for _, err := range e.errs {
		for _, s := range secrets {
			if strings.Contains(err.Error(), s) {
				t.Errorf("an error quotes a secret: %v", err)
			}
		}
	}
}

func TestIssueImpersonatedTokenAndSecrets(t *testing.T) {
	e := newEnv(t, nil)
	ctx := context.Background()
	e.put("db", `{"user":"u1","password":"p1-secret"}`, gcptest.ServiceAccountPrincipal(gsa))
	e.put("api", "api-key-1", gcptest.ServiceAccountPrincipal(gsa))
	e.s.GrantAccess("projects/proj-a/locations/europe-west1/secrets/eu", gcptest.ServiceAccountPrincipal(gsa))
	e.s.AddVersion("projects/proj-a/locations/europe-west1/secrets/eu", []byte("eu-value"))
	e.values = append(e.values, "eu-value")
	req := e.request(t, "team-a", "app", map[string]string{
		"secrets": `
- {resourceName: projects/proj-a/secrets/db/versions/latest, path: db.json}
- {resourceName: projects/proj-a/secrets/db/versions/1, path: user, extractJSONKey: user}
- {resourceName: projects/proj-a/secrets/api/versions/1, fileName: api, mode: 0400}
- {resourceName: projects/proj-a/locations/europe-west1/secrets/eu/versions/latest, path: eu, mode: 0644}
`,
		"accessTokenJSONFile": "token.json",
	})
	l, err := e.issue(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"db.json": `{"user":"u1","password":"p1-secret"}`, "user": "u1", "api": "api-key-1", "eu": "eu-value"}
	for f, v := range want {
		if l.Values[f] != v {
			t.Errorf("file %s = %q, want %q", f, l.Values[f], v)
		}
	}
	if len(l.Modes) != 2 || l.Modes["api"] != 0o400 || l.Modes["eu"] != 0o444 {
		t.Errorf("modes %v, want api 0400 and eu 0444 (write bits dropped)", l.Modes)
	}
	tok := l.Values["access-token"]
	var doc struct {
		AccessToken string    `json:"access_token"`
		TokenType   string    `json:"token_type"`
		Expiry      time.Time `json:"expiry"`
		ExpiresIn   int       `json:"expires_in"`
	}
	if err := json.Unmarshal([]byte(l.Values["token.json"]), &doc); err != nil || doc.AccessToken != tok || doc.TokenType != "Bearer" || !doc.Expiry.Equal(l.ExpiresAt) {
		t.Errorf("token.json %q: %v", l.Values["token.json"], err)
	}
	// The admin's lifetime (600 s by default) of an impersonated token.
	if ttl := l.ExpiresAt.Sub(l.IssuedAt); ttl < 9*time.Minute || ttl > 10*time.Minute+time.Second {
		t.Errorf("token lives %s, want the admin's 10m", ttl)
	}
	if l.Role != gsa || l.Info["serviceAccount"] != gsa || !l.RenewAt.IsZero() {
		t.Errorf("lease %q %v renewAt %v", l.Role, l.Info, l.RenewAt)
	}
	// The pod's token works at the stand-in's authenticated endpoint as the service account.
	var info map[string]string
	r, _ := http.NewRequest(http.MethodGet, e.s.URL+"/tokeninfo", nil)
	r.Header.Set("Authorization", "Bearer "+tok)
	resp, err := e.s.Client().Do(r)
	if err != nil {
		t.Fatal(err)
	}
	_ = json.NewDecoder(resp.Body).Decode(&info)
	resp.Body.Close()
	if info["email"] != gsa {
		t.Errorf("tokeninfo of the pod's token: %v", info)
	}
	if sts, iam, acc := e.s.Calls(gcptest.STS), e.s.Calls(gcptest.IAM), e.s.Calls(gcptest.Access); sts != 1 || iam != 1 || acc != 4 {
		t.Errorf("calls: STS %d, IAM %d, access %d; want 1, 1, 4", sts, iam, acc)
	}

	// Renew and revoke call nothing: a token cannot be extended (the
	// manager re-issues) nor revoked (the audit says so).
	before := e.s.Calls("")
	if _, err := e.p.Renew(ctx, l); !errors.Is(err, provider.ErrNotRenewable) {
		t.Errorf("Renew: %v", err)
	}
	if err := e.p.Revoke(ctx, provider.Lease{ID: l.ID, Params: req.Params}); !errors.Is(err, provider.ErrNotRevocable) {
		t.Errorf("Revoke of a lease that gave the pod a token: %v", err)
	}
	secretsOnly := map[string]string{"accessTokenFile": "", "secrets": req.Params["secrets"]}
	if err := e.p.Revoke(ctx, provider.Lease{ID: "l2", Params: secretsOnly}); err != nil {
		t.Errorf("Revoke of secrets only: %v", err)
	}
	if n := e.s.Calls(""); n != before {
		t.Errorf("renew and revoke made %d calls", n-before)
	}
	l2, err := e.issue(ctx, e.request(t, "team-a", "app", secretsOnly))
	if err != nil || l2.Values["access-token"] != "" || !l2.ExpiresAt.IsZero() || l2.Values["api"] != "api-key-1" {
		t.Errorf("secrets only: %v, token file %v, expiry %v", err, l2.Values["access-token"] != "", l2.ExpiresAt)
	}
	e.noSecretsIn(t, req)
}

// A pod the admin maps to no service account gets its federated token,
// which reads what its own principal may.
func TestFederatedToken(t *testing.T) {
	e := newEnv(t, nil)
	e.put("own", "own-value", e.s.Principal("team-b", "app"))
	l, err := e.issue(context.Background(), e.request(t, "team-b", "app", map[string]string{
		"secrets": "- {resourceName: projects/proj-a/secrets/own/versions/latest, path: own}",
	}))
	if err != nil {
		t.Fatal(err)
	}
	if l.Values["own"] != "own-value" || l.Role != "federated:team-b/app" || l.Values["access-token"] == "" {
		t.Errorf("lease role %q values %d", l.Role, len(l.Values))
	}
	if n := e.s.Calls(gcptest.IAM); n != 0 {
		t.Errorf("%d generateAccessToken calls for an unmapped pod", n)
	}
}

// A version alias is followed at each issue (the manager re-issues at a
// rotation poll); a fixed version asks for no poll.
func TestRotationViaVersionAlias(t *testing.T) {
	e := newEnv(t, nil)
	ctx := context.Background()
	name := "projects/proj-a/secrets/rot"
	e.put("rot", "first", gcptest.ServiceAccountPrincipal(gsa))
	e.put("rot", "second")
	e.s.SetAlias(name, "current", 1)
	params := map[string]string{"rotationPollInterval": "1m", "secrets": "- {resourceName: " + name + "/versions/current, path: v}"}
	req := e.request(t, "team-a", "app", params)
	l, err := e.issue(ctx, req)
	if err != nil || l.Values["v"] != "first" {
		t.Fatalf("%v %q", err, l.Values["v"])
	}
	if got := l.RenewAt.Sub(l.IssuedAt); got != time.Minute {
		t.Errorf("RenewAt %s after issue, want the class's poll", got)
	}
	var versions map[string]string
	if err := json.Unmarshal([]byte(l.Handle["versions"]), &versions); err != nil || !strings.HasSuffix(versions[name+"/versions/current"], "/secrets/rot/versions/1") {
		t.Errorf("versions %v %v", versions, err)
	}
	e.s.SetAlias(name, "current", 2)
	if l, err = e.issue(ctx, req); err != nil || l.Values["v"] != "second" {
		t.Errorf("after the alias moved: %v %q", err, l.Values["v"])
	}
	params["secrets"] = "- {resourceName: " + name + "/versions/1, path: v}"
	if l, err = e.issue(ctx, e.request(t, "team-a", "app", params)); err != nil || !l.RenewAt.IsZero() {
		t.Errorf("a fixed version: %v, RenewAt %v", err, l.RenewAt)
	}
}

// Everything of a class the admin does not allow is refused before any
// call: the stand-in counts none.
func TestTrustChecksBeforeAnyCall(t *testing.T) {
	other := standin.New(t, true)
	e := newEnv(t, func(c *Config) {
		c.Endpoints = nil
		c.ServiceAccounts["team-a/multi"] = []string{gsa, "second@proj-a.iam.gserviceaccount.com"}
	})
	ok := "- {resourceName: projects/proj-a/secrets/s/versions/latest, path: s}"
	for _, tc := range []struct {
		name   string
		sa     string
		params map[string]string
		want   error
	}{
		{"another audience", "app", map[string]string{"audience": "//iam.googleapis.com/projects/9/locations/global/workloadIdentityPools/x/providers/y"}, provider.ErrInvalidParameters},
		{"sts endpoint off the list", "app", map[string]string{"stsEndpoint": other.URL}, provider.ErrInvalidParameters},
		{"iam endpoint off the list", "app", map[string]string{"iamCredentialsEndpoint": other.URL}, provider.ErrInvalidParameters},
		{"secret manager endpoint off the list", "app", map[string]string{"secretManagerEndpoint": other.URL}, provider.ErrInvalidParameters},
		{"project not allowed", "app", map[string]string{"secrets": "- {resourceName: projects/proj-b/secrets/s/versions/1, path: s}"}, provider.ErrInvalidParameters},
		{"service account not mapped", "app", map[string]string{"serviceAccount": "admin@proj-a.iam.gserviceaccount.com"}, provider.ErrInvalidParameters},
		{"service account for an unmapped pod", "other", map[string]string{"serviceAccount": gsa}, provider.ErrInvalidParameters},
		{"several mapped, none named", "multi", nil, provider.ErrInvalidParameters},
		{"provider-adc", "app", map[string]string{"auth": "provider-adc"}, provider.ErrInvalidParameters},
		{"dotdot in a file name", "app", map[string]string{"secrets": "- {resourceName: projects/proj-a/secrets/s/versions/1, path: ../x}"}, provider.ErrInvalidParameters},
		{"unknown parameter", "app", map[string]string{"tokenURL": other.URL}, provider.ErrInvalidParameters},
	} {
		t.Run(tc.name, func(t *testing.T) {
			params := map[string]string{"secrets": ok}
			for k, v := range tc.params {
				params[k] = v
			}
			_, err := e.issue(context.Background(), e.request(t, "team-a", tc.sa, params))
			if !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
			if n, _, _ := other.Seen(); n != 0 || e.s.Calls("") != 0 {
				t.Fatalf("%d calls to the stand-in, %d connections elsewhere, before the refusal", e.s.Calls(""), n)
			}
		})
	}
	// No token for the admin's audience, or one of another identity: refused before any call too.
	req := e.request(t, "team-a", "app", map[string]string{"secrets": ok})
	for name, tokens := range map[string]map[string]provider.Token{
		"no token":                        {"vault": req.Tokens["https:"+testAudience]},
		"another service account's token": {"https:" + testAudience: {Token: standin.Token("team-a", "admin", "", "https:"+testAudience)}},
	} {
		r := req
		r.Tokens = tokens
		if _, err := e.issue(context.Background(), r); !errors.Is(err, provider.ErrPermissionDenied) || e.s.Calls("") != 0 {
			t.Errorf("%s: %v after %d calls", name, err, e.s.Calls(""))
		}
	}
	// The same class with everything allowed reaches the stand-in.
	if _, err := e.issue(context.Background(), req); !errors.Is(err, provider.ErrPermissionDenied) || e.s.Calls("") == 0 {
		t.Errorf("an allowed class: %v after %d calls, want Secret Manager's refusal", err, e.s.Calls(""))
	}
	e.noSecretsIn(t, req)
}

// Without the admin's CA for an endpoint, the pod's token is not sent to
// a server nobody vouches for.
func TestEndpointTrustIsTheAdmins(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.TLS = nil })
	_, err := e.issue(context.Background(), e.request(t, "team-a", "app", map[string]string{"accessTokenFile": "t"}))
	if !errors.Is(err, provider.ErrUnavailable) || e.s.Calls("") != 0 {
		t.Errorf("unverified endpoint: %v after %d calls", err, e.s.Calls(""))
	}
}

func TestBackendRefusals(t *testing.T) {
	e := newEnv(t, nil)
	sa := gcptest.ServiceAccountPrincipal(gsa)
	e.put("s", "value-1", sa)
	e.put("big", strings.Repeat("x", MaxValueBytes+1), sa)
	e.put("hidden", "hidden-value")
	one := func(resource string) map[string]string {
		return map[string]string{"secrets": "- {resourceName: " + resource + ", path: f}"}
	}
	for _, tc := range []struct {
		name   string
		params map[string]string
		inject func()
		want   error
	}{
		{"checksum mismatch", one("projects/proj-a/secrets/s/versions/1"), func() { e.s.CorruptChecksums(true) }, provider.ErrUnavailable},
		{"value over the size cap", one("projects/proj-a/secrets/big/versions/1"), nil, provider.ErrInvalidParameters},
		{"no access", one("projects/proj-a/secrets/hidden/versions/1"), nil, provider.ErrPermissionDenied},
		{"no such version", one("projects/proj-a/secrets/s/versions/9"), nil, provider.ErrNotFound},
		{"STS unavailable", one("projects/proj-a/secrets/s/versions/1"), func() { e.s.Fail(gcptest.STS, 1, 503, 0) }, provider.ErrUnavailable},
		{"IAM refuses", one("projects/proj-a/secrets/s/versions/1"), func() { e.s.Fail(gcptest.IAM, 1, 403, 0) }, provider.ErrPermissionDenied},
		{"Secret Manager throttles", one("projects/proj-a/secrets/s/versions/1"), func() { e.s.Fail(gcptest.Access, 1, 429, 0) }, provider.ErrUnavailable},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.inject != nil {
				tc.inject()
			}
			defer e.s.CorruptChecksums(false)
			_, err := e.issue(context.Background(), e.request(t, "team-a", "app", tc.params))
			if !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
		})
	}
	// A token STS refuses (unsigned, with the pod's claims) is the pod's problem.
	req := e.request(t, "team-a", "app", one("projects/proj-a/secrets/s/versions/1"))
	req.Tokens = map[string]provider.Token{"https:" + testAudience: {Token: standin.Token("team-a", "app", req.Pod.UID, "https:"+testAudience)}}
	if _, err := e.issue(context.Background(), req); !errors.Is(err, provider.ErrPermissionDenied) || !strings.Contains(err.Error(), "invalid_grant") {
		t.Errorf("a token STS refuses: %v", err)
	}
	// Done but unanswered: a token minted that the pod never gets (it
	// lives until its expiry: unrevocable), and the call unavailable.
	for _, svc := range []string{gcptest.STS, gcptest.IAM} {
		e.s.Lose(svc, 1)
		n := len(e.s.Issued())
		_, err := e.issue(context.Background(), e.request(t, "team-a", "app", one("projects/proj-a/secrets/s/versions/1")))
		if !errors.Is(err, provider.ErrUnavailable) || len(e.s.Issued()) == n {
			t.Errorf("%s answers nothing: %v, %d tokens minted", svc, err, len(e.s.Issued())-n)
		}
	}
	// net/http sends a GET again once on a connection dropped before any
	// answer: versions.access unanswered twice fails the issue.
	e.s.Lose(gcptest.Access, 2)
	if _, err := e.issue(context.Background(), e.request(t, "team-a", "app", one("projects/proj-a/secrets/s/versions/1"))); !errors.Is(err, provider.ErrUnavailable) {
		t.Errorf("versions.access answers nothing: %v", err)
	}
	e.s.Fail(gcptest.Access, 0, 0, 0)
	// Each service hanging: the call ends at the caller's deadline, unavailable.
	for _, svc := range []string{gcptest.STS, gcptest.IAM, gcptest.Access} {
		e.s.Fail(svc, 1, 503, time.Hour)
		ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
		_, err := e.issue(ctx, e.request(t, "team-a", "app", one("projects/proj-a/secrets/s/versions/1")))
		cancel()
		if !errors.Is(err, provider.ErrUnavailable) {
			t.Errorf("%s hangs: %v", svc, err)
		}
		e.s.Fail(svc, 0, 0, 0)
	}
	e.noSecretsIn(t, req)
}

// A re-issue (the manager's renewal of the token) reads a pinned version
// once, from the lease it replaces thereafter, and an alias every time;
// a prior that did not read the same version, or holds no value for the
// file, is no source.
func TestReissueReadsAliasesOnlyAndKeepsPinnedValues(t *testing.T) {
	e := newEnv(t, nil)
	ctx := context.Background()
	reader := gcptest.ServiceAccountPrincipal(gsa)
	e.put("pinned", "pinned-v1", reader)
	e.put("pinned", "pinned-v2")
	e.put("moving", "moving-v1", reader)
	e.s.SetAlias("projects/proj-a/secrets/moving", "current", 1)
	req := e.request(t, "team-a", "app", map[string]string{"secrets": `
- {resourceName: projects/proj-a/secrets/pinned/versions/1, path: pinned}
- {resourceName: projects/proj-a/secrets/pinned/versions/1, path: pinned-copy}
- {resourceName: projects/proj-a/secrets/moving/versions/latest, path: latest}
- {resourceName: projects/proj-a/secrets/moving/versions/current, path: current}
`})
	l, err := e.issue(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if n := e.s.Calls(gcptest.Access); n != 4 {
		t.Fatalf("publish: %d versions.access calls, want 4", n)
	}
	e.put("moving", "moving-v2")
	e.s.SetAlias("projects/proj-a/secrets/moving", "current", 2)
	for i := range 3 {
		before, tokens := e.s.Calls(gcptest.Access), e.s.Calls(gcptest.STS)
		prior := l
		req.Prior = &prior
		if l, err = e.issue(ctx, req); err != nil {
			t.Fatal(err)
		}
		if got := e.s.Calls(gcptest.Access) - before; got != 2 {
			t.Errorf("re-issue %d: %d versions.access calls, want 2 (the aliases only)", i, got)
		}
		if e.s.Calls(gcptest.STS) == tokens || l.Values["access-token"] == prior.Values["access-token"] {
			t.Errorf("re-issue %d did not mint a new token", i)
		}
		want := map[string]string{"pinned": "pinned-v1", "pinned-copy": "pinned-v1", "latest": "moving-v2", "current": "moving-v2"}
		for f, v := range want {
			if l.Values[f] != v {
				t.Errorf("re-issue %d: %s = %q, want %q", i, f, l.Values[f], v)
			}
		}
		if l.Handle["versions"] != prior.Handle["versions"] && i > 0 {
			t.Errorf("re-issue %d: versions %s, before %s", i, l.Handle["versions"], prior.Handle["versions"])
		}
	}
	// A prior that recorded another version of the resource, or lacks the
	// file's value, is read past.
	for name, mutate := range map[string]func(*provider.Lease){
		"another version": func(p *provider.Lease) {
			p.Handle = map[string]string{"versions": strings.ReplaceAll(p.Handle["versions"], "/pinned/versions/1", "/pinned/versions/2")}
		},
		"no value": func(p *provider.Lease) { p.Values = map[string]string{} },
	} {
		prior := l
		mutate(&prior)
		req.Prior = &prior
		before := e.s.Calls(gcptest.Access)
		if _, err := e.issue(ctx, req); err != nil {
			t.Fatal(err)
		}
		if got := e.s.Calls(gcptest.Access) - before; got != 4 {
			t.Errorf("%s: %d versions.access calls, want 4", name, got)
		}
	}
	// Pinned secrets and no token file: a re-issue has nothing to call.
	pinnedOnly := map[string]string{"accessTokenFile": "", "secrets": "- {resourceName: projects/proj-a/secrets/pinned/versions/1, path: pinned}"}
	req = e.request(t, "team-a", "app", pinnedOnly)
	if l, err = e.issue(ctx, req); err != nil {
		t.Fatal(err)
	}
	before := e.s.Calls("")
	req.Prior = &l
	if l2, err := e.issue(ctx, req); err != nil || l2.Values["pinned"] != "pinned-v1" || l2.Handle["versions"] != l.Handle["versions"] {
		t.Errorf("pinned only: %v, value kept %v", err, l2.Values["pinned"] == "pinned-v1")
	}
	if n := e.s.Calls("") - before; n != 0 {
		t.Errorf("pinned only: a re-issue made %d calls", n)
	}
	e.noSecretsIn(t, req)
}
