package chart

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/util/version"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/yaml"

	v1alpha1 "github.com/ephemeral-secrets/csi-driver/pkg/apis/ephemeralsecrets/v1alpha1"
	"github.com/ephemeral-secrets/csi-driver/pkg/inventory"
	"github.com/ephemeral-secrets/csi-driver/test/kube"
)

// The compatibility matrix: on a real API server of each Kubernetes
// version of test/kube/versions (the oldest the chart claims, and the
// node's), every way to install is accepted as a user runs it, and the
// chart's admission policies are in force there:
//   - helm install with the default values, then with every value set
//     (helm checks Chart.yaml's kubeVersion against the server);
//   - the kustomize crds and base, applied server-side.
//
// Each install is then put to the test as a compromised node plugin
// would: its token, bound to a pod on its node, carries the node
// (the issuer's check reviews it), and the policies refuse a record of
// another node and a tombstone, and anyone but the issuer the issuer's
// finalizer.
func TestCompatibilityMatrix(t *testing.T) {
	node, oldest := kube.Versions()
	if node == "" || oldest == "" {
		t.Fatalf("test/kube/versions names node %q, oldest %q", node, oldest)
	}
	for _, v := range []string{oldest, node} {
		t.Run(v, func(t *testing.T) { testVersion(t, v) })
	}
}

// Chart.yaml's kubeVersion is what the matrix proves: the oldest
// version's minor renders, the minor below it does not.
func TestKubeVersionIsTheMatrixFloor(t *testing.T) {
	_, oldest := kube.Versions()
	v := version.MustParseGeneric(oldest)
	below := fmt.Sprintf("%d.%d.99", v.Major(), v.Minor()-1)
	for _, tc := range []struct {
		kube    string
		renders bool
	}{
		{fmt.Sprintf("%d.%d.0", v.Major(), v.Minor()), true},
		{below, false},
	} {
		out, err := helm(t, "template", "esc", chartDir, "--kube-version", tc.kube)
		if (err == nil) != tc.renders {
			t.Errorf("helm template for Kubernetes %s: %v, want rendered %v\n%.300s", tc.kube, err, tc.renders, out)
		}
	}
}

func testVersion(t *testing.T, want string) {
	ctx := context.Background()
	start := time.Now()
	c, err := kube.StartWith(kube.Options{Version: want})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Stop)
	t.Logf("kube-apiserver %s ready in %s", want, time.Since(start).Round(time.Millisecond))
	clients, err := kubernetes.NewForConfig(c.Config())
	if err != nil {
		t.Fatal(err)
	}
	info, err := clients.Discovery().ServerVersion()
	if err != nil {
		t.Fatal(err)
	}
	if info.GitVersion != "v"+want {
		t.Fatalf("the API server is %s, want v%s", info.GitVersion, want)
	}
	server := version.MustParseGeneric(want)
	dir := t.TempDir()
	kubeconfig := filepath.Join(dir, "kubeconfig")
	if err := c.Kubeconfig(kubeconfig, "", kube.AdminToken); err != nil {
		t.Fatal(err)
	}
	helmRun := func(args ...string) (string, error) {
		bin, err := kube.Tool("helm")
		if err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(bin, args...)
		cmd.Env = append(os.Environ(), "KUBECONFIG="+kubeconfig, "HELM_CACHE_HOME="+dir, "HELM_CONFIG_HOME="+dir, "HELM_DATA_HOME="+dir)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	// The every-value file turns monitoring on: prometheus-operator's CRDs.
	stubs, err := os.ReadFile(filepath.Join("..", "cluster", "testdata", "monitoring-crds.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if err := kube.Apply(ctx, c.Config(), stubs, false); err != nil {
		t.Fatal(err)
	}
	const ns = "ephemeral-secrets"
	if _, err := clients.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	everyValue := []string{"-f", "testdata/every-value.yaml"}
	if server.LessThan(version.MustParseGeneric("1.35.0")) {
		everyValue = []string{"-f", withoutTokensInSecrets(t, "testdata/every-value.yaml")}
	}
	helmInstall := func(t *testing.T, values ...string) []byte {
		t.Helper()
		out, err := helmRun(append([]string{"install", "esc", chartDir, "-n", ns}, values...)...)
		if err != nil {
			t.Fatalf("helm install on %s: %v\n%s", want, err, out)
		}
		manifest, err := helmRun("get", "manifest", "esc", "-n", ns)
		if err != nil {
			t.Fatalf("helm get manifest: %v\n%s", err, manifest)
		}
		checkNotes(t, out, server, requestsTokens(t, []byte(manifest)))
		checkTokenDelivery(t, clients, ns)
		t.Cleanup(func() {
			if out, err := helmRun("uninstall", "esc", "-n", ns, "--wait", "--no-hooks"); err != nil {
				t.Errorf("helm uninstall: %v\n%s", err, out)
			}
		})
		return []byte(manifest)
	}
	kustomize := func(t *testing.T) []byte {
		t.Helper()
		var stream []byte
		for _, dir := range []string{"crds", "base"} {
			bin, err := kube.Tool("kustomize")
			if err != nil {
				t.Fatal(err)
			}
			out, err := exec.Command(bin, "build", filepath.Join("..", "..", "deploy", "kustomize", dir)).Output()
			if err != nil {
				t.Fatalf("kustomize build %s: %v", dir, err)
			}
			stream = append(append(stream, "\n---\n"...), out...)
		}
		if err := kube.ApplyServerSide(ctx, c.Config(), stream, "esc-matrix"); err != nil {
			t.Fatalf("server-side apply of the kustomize crds and base on %s: %v", want, err)
		}
		return stream
	}
	for _, tc := range []struct {
		name    string
		install func(t *testing.T) []byte
	}{
		{"helm defaults", func(t *testing.T) []byte { return helmInstall(t) }},
		{"helm every value", func(t *testing.T) []byte { return helmInstall(t, everyValue...) }},
		{"kustomize base", kustomize},
	} {
		t.Run(tc.name, func(t *testing.T) {
			start := time.Now()
			stream := tc.install(t)
			objs, err := kube.Decode(stream)
			if err != nil {
				t.Fatal(err)
			}
			checkKinds(t, objs)
			// Both CRDs, wherever they came from (helm installs the chart's
			// crds/ outside the release).
			crds := `{"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition", "metadata": {"name": "credentials.ephemeral-secrets.csi.dev"}}
{"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition", "metadata": {"name": "secretproviderclasses.secrets-store.csi.x-k8s.io"}}`
			missing, err := kube.Missing(ctx, c.Config(), append(append(stream, "\n---\n"...), crds...))
			if err != nil {
				t.Fatal(err)
			}
			if len(missing) > 0 {
				t.Errorf("not in the API after the install: %v", missing)
			}
			plugin, issuer := accounts(t, objs)
			checkPolicies(t, c, clients, ns, plugin, issuer, strings.ReplaceAll(tc.name, " ", "-"))
			t.Logf("%s on %s: installed and checked in %s", tc.name, want, time.Since(start).Round(time.Millisecond))
		})
	}
}

// checkKinds: what the chart needs the API to take is in the stream.
func checkKinds(t *testing.T, objs []*unstructured.Unstructured) {
	t.Helper()
	count := map[string]int{}
	for _, o := range objs {
		count[o.GetKind()]++
	}
	for kind, n := range map[string]int{
		"CustomResourceDefinition": 1, "CSIDriver": 1, "ValidatingAdmissionPolicy": 3, "ValidatingAdmissionPolicyBinding": 3,
		"ClusterRole": 4, "ClusterRoleBinding": 2, "ServiceAccount": 1, "DaemonSet": 1,
	} {
		if count[kind] < n {
			t.Errorf("%d %s objects, want at least %d (have %v)", count[kind], kind, n, count)
		}
	}
}

// accounts are the service accounts of the node plugin (the DaemonSet's)
// and of the issuer (its Deployment's; "" when the install runs none) in
// an install's objects.
func accounts(t *testing.T, objs []*unstructured.Unstructured) (plugin, issuer string) {
	t.Helper()
	for _, o := range objs {
		sa, _, _ := unstructured.NestedString(o.Object, "spec", "template", "spec", "serviceAccountName")
		component, _, _ := unstructured.NestedString(o.Object, "spec", "template", "metadata", "labels", "app.kubernetes.io/component")
		switch {
		case o.GetKind() == "DaemonSet":
			plugin = sa
		case o.GetKind() == "Deployment" && component == "issuer":
			issuer = sa
		}
	}
	if plugin == "" {
		t.Fatal("no node plugin's service account")
	}
	return plugin, issuer
}

// checkPolicies plays a node plugin of node a, in namespace ns as
// account plugin, against the policies in force: its pod-bound token
// names its node (TokenReview, as the issuer asks), it writes its own
// node's record and is refused node b's and a tombstone; the admin is
// refused the issuer's finalizer, which the issuer (if the install runs
// one) may put.
func checkPolicies(t *testing.T, c *kube.Cluster, admin *kubernetes.Clientset, ns, plugin, issuer, step string) {
	t.Helper()
	ctx := context.Background()
	records := "records-" + step
	nodeA, nodeB := step+"-a", step+"-b"
	if _, err := admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: records}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: nodeA}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	pod, err := admin.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "plugin-" + step},
		Spec: corev1.PodSpec{NodeName: nodeA, ServiceAccountName: plugin,
			Containers: []corev1.Container{{Name: "driver", Image: "registry.k8s.io/pause:3.10"}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	token := saToken(t, admin, ns, plugin, &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID})

	// The issuer's node check: the review of the plugin's token names node a.
	review, err := admin.AuthenticationV1().TokenReviews().Create(ctx, &authenticationv1.TokenReview{Spec: authenticationv1.TokenReviewSpec{Token: token}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got := review.Status.User.Extra["authentication.kubernetes.io/node-name"]; !review.Status.Authenticated || !slices.Equal(got, authenticationv1.ExtraValue{nodeA}) {
		t.Errorf("TokenReview of the plugin's pod-bound token: authenticated %v, node-name %v, want [%s] (%s)", review.Status.Authenticated, got, nodeA, review.Status.Error)
	}

	adminInv := inventoryAs(t, c.Config(), "")
	pluginInv := inventoryAs(t, c.Config(), token)
	// record is a Credential of node named name ("": a generated name).
	record := func(name, node string, finalizers ...string) *v1alpha1.Credential {
		return &v1alpha1.Credential{
			ObjectMeta: metav1.ObjectMeta{Name: name, GenerateName: "probe-", Namespace: records, Finalizers: finalizers,
				Labels: map[string]string{v1alpha1.LabelNode: node}},
			Spec: v1alpha1.CredentialSpec{Pod: v1alpha1.PodReference{Name: "app", UID: "app-uid"}, Node: node,
				Class: records + "/class", Provider: "postgres", LeaseID: "lease-" + step},
		}
	}
	// In force once the admin is refused the issuer's finalizer (a
	// policy takes a moment to reach admission).
	var refusal error
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		created, err := adminInv.Create(ctx, record("", nodeA, v1alpha1.FinalizerRevoke))
		if err == nil {
			created.Finalizers = nil
			if _, err := adminInv.Update(ctx, created); err != nil {
				t.Fatal(err)
			}
			continue
		}
		if refusal = err; apierrors.IsForbidden(err) || apierrors.IsInvalid(err) {
			break
		}
	}
	if refusal == nil || !strings.Contains(refusal.Error(), "only the issuer puts its finalizer") {
		t.Fatalf("the admin's record with the issuer's finalizer: %v (are the policies in force?)", refusal)
	}

	type attempt struct {
		what    string
		client  *inventory.Client
		cred    *v1alpha1.Credential
		refusal string // "" when allowed
	}
	attempts := []attempt{
		{"the plugin, a record of its own node", pluginInv, record("own-node", nodeA), ""},
		{"the plugin, a record of another node", pluginInv, record("other-node", nodeB), "only the credential records of its own node"},
		{"the plugin, a record with the issuer's finalizer", pluginInv, record("plugin-finalizer", nodeA, v1alpha1.FinalizerRevoke), "finalizer"},
		{"the plugin, a tombstone", pluginInv, record(v1alpha1.TombstonePrefix+"forged", nodeA), "only the issuer writes a tombstone"},
		{"the admin, a tombstone", adminInv, record(v1alpha1.TombstonePrefix+"admin", nodeA), "only the issuer writes a tombstone"},
	}
	if issuer != "" {
		issuerInv := inventoryAs(t, c.Config(), saToken(t, admin, ns, issuer, nil))
		attempts = append(attempts, attempt{"the issuer, a record with its finalizer", issuerInv, record("issuer-finalizer", nodeB, v1alpha1.FinalizerRevoke), ""})
	}
	for _, tc := range attempts {
		_, err := tc.client.Create(ctx, tc.cred)
		switch {
		case tc.refusal == "" && err != nil:
			t.Errorf("%s: refused: %v", tc.what, err)
		case tc.refusal != "" && (err == nil || !strings.Contains(err.Error(), tc.refusal)):
			t.Errorf("%s: %v, want refused (%q)", tc.what, err, tc.refusal)
		}
	}
}

// saToken is a TokenRequest token of a service account, bound to ref
// (nil: to nothing).
func saToken(t *testing.T, admin *kubernetes.Clientset, ns, account string, ref *authenticationv1.BoundObjectReference) string {
	t.Helper()
	tr, err := admin.CoreV1().ServiceAccounts(ns).CreateToken(context.Background(), account,
		&authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{BoundObjectRef: ref}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("token of %s/%s: %v", ns, account, err)
	}
	return tr.Status.Token
}

// inventoryAs is an inventory client with a bearer token ("": the admin).
func inventoryAs(t *testing.T, admin *rest.Config, token string) *inventory.Client {
	t.Helper()
	cfg := rest.CopyConfig(admin)
	if token != "" {
		cfg.BearerToken = token
	}
	c, err := inventory.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// withoutTokensInSecrets writes a copy of a values file without the
// CSIDriver's token delivery (csiDriver's key that asks for tokens in
// secrets): a cluster before 1.35 has no serviceAccountTokenInSecrets,
// and the chart's default delivery is the one to install there.
func withoutTokensInSecrets(t *testing.T, file string) string {
	t.Helper()
	data, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var values map[string]any
	if err := yaml.Unmarshal(data, &values); err != nil {
		t.Fatal(err)
	}
	csi, _ := values["csiDriver"].(map[string]any)
	removed := 0
	for k := range csi {
		if strings.Contains(strings.ToLower(k), "insecrets") {
			delete(csi, k)
			removed++
		}
	}
	if removed == 0 {
		t.Fatalf("%s sets no csiDriver token delivery: the every-value file should", file)
	}
	out, err := yaml.Marshal(values)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "values.yaml")
	if err := os.WriteFile(path, out, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// checkTokenDelivery: where kubelet mints tokens, the CSIDriver as the
// API server stored it (a field this version lacks is dropped, with no
// more than a warning) and the driver's --tokens-in-secrets agree on
// where the tokens travel; a disagreement fails every publish that needs
// a token.
func checkTokenDelivery(t *testing.T, clients *kubernetes.Clientset, ns string) {
	t.Helper()
	ctx := context.Background()
	csi, err := clients.StorageV1().CSIDrivers().Get(ctx, "ephemeral-secrets.csi.dev", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(csi.Spec.TokenRequests) == 0 {
		return
	}
	stored := csi.Spec.ServiceAccountTokenInSecrets != nil && *csi.Spec.ServiceAccountTokenInSecrets
	dss, err := clients.AppsV1().DaemonSets(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	checked := 0
	for _, ds := range dss.Items {
		for _, c := range ds.Spec.Template.Spec.Containers {
			if c.Name != "driver" {
				continue
			}
			checked++
			if want := fmt.Sprintf("--tokens-in-secrets=%v", stored); !slices.Contains(c.Args, want) {
				t.Errorf("the stored CSIDriver has serviceAccountTokenInSecrets %v, the driver's args %v lack %s", stored, c.Args, want)
			}
		}
	}
	if checked != 1 {
		t.Errorf("%d driver containers in %s, want 1", checked, ns)
	}
}

// requestsTokens: the CSIDriver of a stream has kubelet mint tokens.
func requestsTokens(t *testing.T, stream []byte) bool {
	t.Helper()
	objs, err := kube.Decode(stream)
	if err != nil {
		t.Fatal(err)
	}
	for _, o := range objs {
		if reqs, _, _ := unstructured.NestedSlice(o.Object, "spec", "tokenRequests"); o.GetKind() == "CSIDriver" && len(reqs) > 0 {
			return true
		}
	}
	return false
}

// checkNotes: the install's notes name what this version lacks: the
// node in service-account tokens by default (before 1.32), and, where
// the install asks kubelet for tokens, serviceAccountTokenInSecrets
// (before 1.35).
func checkNotes(t *testing.T, out string, server *version.Version, tokens bool) {
	t.Helper()
	for _, tc := range []struct {
		mark  string
		lacks bool
	}{
		{"ServiceAccountTokenPodNodeInfo", server.LessThan(version.MustParseGeneric("1.32.0"))},
		{"serviceAccountTokenInSecrets", tokens && server.LessThan(version.MustParseGeneric("1.35.0"))},
	} {
		if got := strings.Contains(out, tc.mark); got != tc.lacks {
			t.Errorf("the NOTES on %s name %s: %v, want %v:\n%s", server, tc.mark, got, tc.lacks, out)
		}
	}
}
