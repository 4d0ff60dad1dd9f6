package realcluster

import (
	"context"
	"encoding/json"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"github.com/ephemeral-secrets/csi-driver/pkg/apis/ephemeralsecrets/v1alpha1"
	"github.com/ephemeral-secrets/csi-driver/pkg/audit"
	"github.com/ephemeral-secrets/csi-driver/test/gcptest"
	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/image"
	"github.com/ephemeral-secrets/csi-driver/test/kube"
	"github.com/ephemeral-secrets/csi-driver/test/node"
)

// gcpOnly: the GCP profile serves examples/gcp. The Google stand-in
// (STS, IAM Credentials, Secret Manager, tokeninfo) plays Google, its
// workload identity provider trusting this cluster's service-account
// issuer (it fetches the real API server's JWKS, as Google fetches a
// cluster's); the driver's pod reaches it at the node's address, over TLS
// verified with the CA the admin puts in the backend Secret. The pod's
// token is its own (kubelet's tokenRequests, the chart's
// providers.gcp.tokenAudience), the example's files unchanged but for the
// image: the pause image holds the pod, and the test calls the
// authenticated endpoint with the pod's access-token file, as the
// example's gcloud would. Then the namespace goes, and the uninstall
// leaves nothing.
func (p *profiles) gcpOnly(t *testing.T) {
	ctx := context.Background()
	example, err := os.ReadFile(filepath.Join(repoRoot, "examples/gcp/admin/backends.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var cfg map[string]map[string]any
	if err := yaml.Unmarshal(example, &cfg); err != nil {
		t.Fatal(err)
	}
	gc := cfg["gcp"]
	audience := gc["audience"].(string)
	gsa := gc["serviceAccounts"].(map[string]any)["ai-agents/research-agent"].([]any)[0].(string)

	g := gcptest.Start(t, gcptest.Options{Issuer: cluster.Issuer, OIDCClient: gcptest.OIDCClient(cluster.CAPEM, kube.AdminToken),
		Audience: audience, CertIPs: []net.IP{net.ParseIP(node.NodeIP)}})
	t.Cleanup(func() {
		for _, tok := range g.Issued() {
			harness.RememberSecret(tok)
		}
	})
	g.AllowImpersonation(gsa, g.Principal("ai-agents", "research-agent"))
	apiKey := "gcp-search-" + strconv.FormatInt(time.Now().UnixNano(), 36)
	harness.RememberSecret(apiKey)
	g.GrantAccess("projects/acme-prod/secrets/search-api-key", gcptest.ServiceAccountPrincipal(gsa))
	g.AddVersion("projects/acme-prod/secrets/search-api-key", []byte(apiKey))

	// The driver's pod reaches the node's address only.
	google := "https://" + strings.TrimPrefix(p.forward(t, strings.TrimPrefix(g.URL, "https://")), "http://")
	gc["stsEndpoint"], gc["iamCredentialsEndpoint"], gc["secretManagerEndpoint"] = google, google, google
	gc["tls"] = map[string]any{google: map[string]any{"caCert": "/etc/ephemeral-secrets/backends/google-ca.pem"}}
	backendsYAML, err := yaml.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := cluster.InstallDriverWithFiles(ctx, repoRoot, backendsYAML, map[string][]byte{"google-ca.pem": g.CAPEM},
		"-f", filepath.Join(repoRoot, "test/realcluster/testdata/profile-values.yaml"),
		"--set", "providers.gcp.enabled=true", "--set", "providers.gcp.tokenAudience=https:"+audience); err != nil {
		t.Fatal(err)
	}
	report(t, "helm install (providers.gcp.enabled) to the driver registered", time.Since(start))
	checkClean(t, false)

	created := time.Now()
	applyExampleWith(t, "examples/gcp", strings.NewReplacer(
		"image: google/cloud-sdk:slim", "image: "+image.PauseImage,
		`      command: ["sh", "-c", "gcloud storage cat gs://acme-reports/q3.csv && sleep infinity"]`+"\n", "",
	))
	pod := waitPod(t, "ai-agents", "research-agent", 2*time.Minute, corev1.PodRunning)
	report(t, "GCP example pod Running, after apply", time.Since(created))
	if got := volumeFile(t, pod, "gcp", "search-api-key"); got != apiKey {
		t.Errorf("search-api-key holds %d bytes, not the Secret Manager value", len(got))
	}
	tok := volumeFile(t, pod, "gcp", "access-token")
	harness.RememberSecret(tok)
	// The pod's token at the stand-in's authenticated endpoint, by the
	// address the pod's network reaches.
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, google+"/tokeninfo", nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+tok)
	resp, err := g.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var info map[string]string
	_ = json.NewDecoder(resp.Body).Decode(&info)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || info["email"] != gsa {
		t.Errorf("tokeninfo with the pod's access token: HTTP %d, %v; want the service account %s", resp.StatusCode, info, gsa)
	}
	var doc struct {
		AccessToken string `json:"access_token"`
	}
	if err := json.Unmarshal([]byte(volumeFile(t, pod, "gcp", "access-token.json")), &doc); err != nil || doc.AccessToken != tok {
		t.Errorf("access-token.json does not hold the token: %v", err)
	}
	if n := g.Calls(gcptest.STS); n != 1 {
		t.Errorf("%d token exchanges for one pod", n)
	}
	cred := credentialOf(t, pod)
	if cred.Spec.Provider != "gcp" || !slices.Contains(cred.Finalizers, v1alpha1.FinalizerNodeRevoke) || cred.Status.ExpiresAt == nil {
		t.Fatalf("Credential %s: provider %s, finalizers %v, expires %v", cred.Name, cred.Spec.Provider, cred.Finalizers, cred.Status.ExpiresAt)
	}
	auditRecords(t, driverPod(t))
	// Google's token cannot be revoked: the namespace must not wait for
	// its expiry (10 minutes here).
	timedNamespaceDeletion(t, "ai-agents", "driver running (Google access token, 10 min)")
	harness.Eventually(t, time.Minute, "the audit says the token lives until its expiry", func() (bool, error) {
		return slices.ContainsFunc(auditRecords(t, driverPod(t)), func(r audit.Record) bool {
			return r.Stage == audit.Revoke && r.Outcome == audit.Unrevocable
		}), nil
	})
	start = time.Now()
	if out, err := uninstall(ctx); err != nil {
		t.Fatalf("helm uninstall: %v\n%s", err, out)
	}
	report(t, "helm uninstall (GCP profile)", time.Since(start))
	nothingLeft(t)
	dropDriverNamespace(t)
}
