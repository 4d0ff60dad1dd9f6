package realcluster

import (
	"context"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/ephemeral-secrets/csi-driver/pkg/apis/ephemeralsecrets/v1alpha1"
	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/kube"
	"github.com/ephemeral-secrets/csi-driver/test/node"
	"github.com/ephemeral-secrets/csi-driver/test/pgtest"
	"github.com/ephemeral-secrets/csi-driver/test/vaulttest"
)

// testVaultExample: examples/vault with Vault's kubernetes auth method,
// which checks the pod's token, minted by the real kubelet for the
// CSIDriver's tokenRequests, with this cluster's TokenReview.
func testVaultExample(t *testing.T) {
	ctx := context.Background()
	v, err := vaulttest.StartOn(node.NodeIP) // the driver's pod reaches it over the pods' network
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	harness.RegisterLog(v.LogFile)
	setupVault(t, v)

	// The admin: Vault's address allowed, the provider's token requested.
	// The node plugins' Secret (PostgreSQL is the issuer's).
	_, nodePart, err := node.SplitBackends(backends(t))
	if err != nil {
		t.Fatal(err)
	}
	cfg := map[string]any{}
	if err := yaml.Unmarshal(nodePart, &cfg); err != nil {
		t.Fatal(err)
	}
	cfg["vault"] = map[string]any{"addresses": []string{v.Addr}}
	data, err := yaml.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	sec, err := cluster.Clients.CoreV1().Secrets(node.Namespace).Get(ctx, "ephemeral-secrets-backends", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	sec.Data["backends.yaml"] = data
	if _, err := cluster.Clients.CoreV1().Secrets(node.Namespace).Update(ctx, sec, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	// The Secret edited in place: the running driver reloads it (kubelet
	// swaps the mounted file; the driver notices within its interval).
	gen := func() float64 { return scrape(t).get("ephemeral_secrets_backend_config_generation") }
	before := gen()
	harness.Eventually(t, 2*time.Minute, "the driver to load the edited backend Secret", func() (bool, error) {
		return gen() > before, nil
	})
	pod0 := driverPod(t)
	// Then the provider's token requested: an upgrade that changes the
	// CSIDriver, not the driver's pod. Tokens in the request's secrets
	// (this node runs 1.35 or later): the driver's --tokens-in-secrets stays
	// what it is with no token requested, so its pod stays (with the
	// default, false, enabling the first token provider restarts the node
	// plugins; TestProfiles runs Vault that way).
	if _, err := cluster.Helm(ctx, "upgrade", "ephemeral-secrets-csi", filepath.Join(repoRoot, "deploy/helm/ephemeral-secrets-csi"),
		"--namespace", node.Namespace, "--wait", "--timeout", "3m", "-f", userValues(),
		"--set", "providers.vault.enabled=true,csiDriver.tokensInSecrets=true"); err != nil {
		t.Fatal(err)
	}
	if p := driverPod(t); p.UID != pod0.UID {
		t.Fatalf("the upgrade replaced the driver's pod; the reload was not what served Vault")
	}

	// The team: the example as written, but for the image and the addresses.
	applyExampleWith(t, "examples/vault", strings.NewReplacer(
		"https://vault.vault.svc:8200", v.Addr,
		"PGHOST=postgres.databases.svc", "PGHOST="+node.NodeIP,
		"PGPORT=5432", "PGPORT="+strconv.Itoa(db.Port),
	))
	pod := waitPod(t, "ai-agents", "research-agent", 2*time.Minute, corev1.PodRunning)
	waitLog(t, "ai-agents", "research-agent", "agent", time.Minute, `forbidden query refused: .*customers.*42501`)
	m := regexp.MustCompile(`login ok: user=(v-\S+)`).FindStringSubmatch(podLogs(t, "ai-agents", "research-agent", "agent"))
	if m == nil {
		t.Fatalf("db-check did not log in with a Vault database user:\n%s", podLogs(t, "ai-agents", "research-agent", "agent"))
	}
	user := m[1]
	// The node plugin records the Vault lease it will revoke itself.
	cred := credentialOf(t, pod)
	if cred.Spec.Provider != "vault" || cred.Spec.Node != node.Name || !slices.Contains(cred.Finalizers, v1alpha1.FinalizerNodeRevoke) ||
		slices.Contains(cred.Finalizers, v1alpha1.FinalizerRevoke) || cred.Status.ExpiresAt == nil {
		t.Fatalf("Credential %s: provider %q, node %q, finalizers %v, expires %v; want vault, %s, the node's finalizer alone, an expiry",
			cred.Name, cred.Spec.Provider, cred.Spec.Node, cred.Finalizers, cred.Status.ExpiresAt, node.Name)
	}
	harness.RememberSecret(volumeFile(t, pod, "vault", "db-password"))
	if key := volumeFile(t, pod, "vault", "openai-key"); !strings.HasPrefix(key, "sk-test-") {
		t.Fatalf("openai-key holds %d bytes of something else", len(key))
	} else {
		harness.RememberSecret(key)
	}

	// The pod goes: its Vault token is revoked, and with it the lease and
	// the database user.
	deletePod(t, "ai-agents", "research-agent")
	roleGone(t, user, 2*time.Minute)
	harness.Eventually(t, time.Minute, "the Credential of the deleted pod gone", func() (bool, error) {
		_, err := inventoryClient(t).Get(ctx, cred.Namespace, cred.Name)
		if apierrors.IsNotFound(err) {
			return true, nil
		}
		return false, err
	})
}

// setupVault configures Vault as its admin would for the example: the
// kubernetes auth method checking tokens with this cluster's TokenReview,
// the database engine on the node's PostgreSQL, and a KV secret.
func setupVault(t *testing.T, v *vaulttest.Server) {
	t.Helper()
	ctx := context.Background()
	// The reviewer: a service account Vault calls TokenReview as.
	if _, err := cluster.Clients.CoreV1().ServiceAccounts(node.Namespace).Create(ctx,
		&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "vault-reviewer"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := cluster.Clients.RbacV1().ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "vault-reviewer"},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: "system:auth-delegator"},
		Subjects:   []rbacv1.Subject{{Kind: "ServiceAccount", Name: "vault-reviewer", Namespace: node.Namespace}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	tr, err := cluster.Clients.CoreV1().ServiceAccounts(node.Namespace).CreateToken(ctx, "vault-reviewer",
		&authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	harness.RememberSecret(tr.Status.Token)
	cl, err := v.Client()
	if err != nil {
		t.Fatal(err)
	}
	for _, st := range []struct {
		path string
		data map[string]any
	}{
		{"sys/auth/kubernetes", map[string]any{"type": "kubernetes"}},
		{"auth/kubernetes/config", map[string]any{
			"kubernetes_host": cluster.URL, "kubernetes_ca_cert": string(cluster.CAPEM),
			"token_reviewer_jwt": tr.Status.Token, "disable_local_ca_jwt": true,
		}},
		{"sys/policies/acl/research-agent", map[string]any{"policy": `
path "database/creds/orders-reader" { capabilities = ["read"] }
path "secret/data/agents" { capabilities = ["read"] }
`}},
		{"auth/kubernetes/role/research-agent", map[string]any{
			"bound_service_account_names": []string{"research-agent"}, "bound_service_account_namespaces": []string{"ai-agents"},
			"audience": "vault", "token_policies": []string{"research-agent"}, "token_ttl": "1h",
		}},
		{"sys/mounts/database", map[string]any{"type": "database"}},
		{"database/config/shop", map[string]any{
			"plugin_name": "postgresql-database-plugin", "connection_url": db.URLFor("postgres", pgtest.AdminPassword, "shop"),
			"allowed_roles": "*", "verify_connection": true,
		}},
		{"database/roles/orders-reader", map[string]any{
			"db_name": "shop",
			"creation_statements": []string{
				`CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';`,
				`GRANT SELECT ON public.orders TO "{{name}}";`,
			},
			"default_ttl": 300, "max_ttl": 3600,
		}},
		{"secret/data/agents", map[string]any{"data": map[string]any{"openai-key": "sk-test-" + strconv.FormatInt(time.Now().UnixNano(), 36)}}},
	} {
		if _, err := cl.Logical().WriteWithContext(ctx, st.path, st.data); err != nil {
			t.Fatalf("vault %s: %v", st.path, err)
		}
	}
}

// applyExampleWith applies an example's YAML files in kubectl's order with
// the images built here and the replacements r makes (the addresses).
func applyExampleWith(t *testing.T, dir string, r *strings.Replacer) {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(repoRoot, dir, "*.yaml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no YAML in %s: %v", dir, err)
	}
	sort.Strings(files)
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		b = dbCheckImage.ReplaceAll([]byte(r.Replace(string(b))), []byte("image: "+node.DBCheckImage))
		if err := kube.Apply(context.Background(), cluster.Config(), b, false); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
	}
}

var dbCheckImage = regexp.MustCompile(`image: ghcr\.io/ephemeral-secrets/db-check:\S+`)
