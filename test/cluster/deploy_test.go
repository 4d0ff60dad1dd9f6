package cluster

import (
	"bytes"
	"context"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/restmapper"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/ephemeral-secrets/csi-driver/test/kube"
)

func render(t *testing.T, tool string, args ...string) []byte {
	t.Helper()
	bin, err := kube.Tool(tool)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Dir = repoRoot
	out, err := cmd.Output()
	if err != nil {
		if ee, ok := err.(*exec.ExitError); ok {
			t.Fatalf("%s %v: %v: %s", tool, args, err, ee.Stderr)
		}
		t.Fatalf("%s %v: %v", tool, args, err)
	}
	return out
}

// readTree maps each file under dir (relative name) to its content.
func readTree(t *testing.T, dir string) map[string]string {
	t.Helper()
	files := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		files[rel] = string(data)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return files
}

// deploy/kustomize is what `make manifests` renders from the chart now:
// the chart is the one source, and nobody edited the copy.
func TestManifestsAreCurrent(t *testing.T) {
	helm, err := kube.Tool("helm")
	if err != nil {
		t.Fatal(err)
	}
	out := t.TempDir()
	cmd := exec.Command(filepath.Join(repoRoot, "deploy", "render.sh"), helm, out)
	cmd.Dir = repoRoot
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("deploy/render.sh: %v\n%s", err, b)
	}
	want := readTree(t, out)
	have := readTree(t, filepath.Join(repoRoot, "deploy", "kustomize"))
	for name, w := range want {
		if h, ok := have[name]; !ok {
			t.Errorf("deploy/kustomize/%s is missing: run make manifests", name)
		} else if h != w {
			t.Errorf("deploy/kustomize/%s is stale: run make manifests", name)
		}
	}
	for name := range have {
		if _, ok := want[name]; !ok {
			t.Errorf("deploy/kustomize/%s is not rendered from the chart: remove it or add it to the chart", name)
		}
	}
}

// The API server accepts every object of every way to install: the
// kustomize base and monitoring overlay, the chart's defaults, and the
// chart with every value set (with serviceAccountTokenInSecrets, which
// this API server, 1.35 or later, takes with tokenRequests). The same on
// the oldest version the chart claims is test/chart's matrix.
func TestRenderedObjectsAreAccepted(t *testing.T) {
	chart := filepath.Join("deploy", "helm", "ephemeral-secrets-csi")
	stubs, err := os.ReadFile("testdata/monitoring-crds.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if err := kube.Apply(context.Background(), cluster.Config(), stubs, false); err != nil {
		t.Fatal(err)
	}
	node, _ := kube.Versions()
	helmArgs := []string{"template", "esc", chart, "--namespace", "ephemeral-secrets", "--kube-version", node}
	for _, tc := range []struct {
		name   string
		stream []byte
		kinds  []string
	}{
		{"kustomize crds and base", append(render(t, "kustomize", "build", "deploy/kustomize/crds"),
			append([]byte("\n---\n"), render(t, "kustomize", "build", "deploy/kustomize/base")...)...),
			[]string{"CustomResourceDefinition", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "CSIDriver", "DaemonSet"}},
		{"kustomize monitoring", render(t, "kustomize", "build", "deploy/kustomize/monitoring"),
			[]string{"DaemonSet", "Service", "ServiceMonitor", "PrometheusRule", "ConfigMap"}},
		{"kustomize base with the gcp component", gcpOverlay(t), []string{"DaemonSet", "CSIDriver"}},
		{"helm defaults", render(t, "helm", helmArgs...), []string{"DaemonSet", "CSIDriver"}},
		{"helm every value", render(t, "helm", append(helmArgs, "-f", "test/chart/testdata/every-value.yaml")...),
			[]string{"DaemonSet", "CSIDriver", "ServiceMonitor", "PrometheusRule"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			objs, err := kube.Decode(tc.stream)
			if err != nil {
				t.Fatal(err)
			}
			var kinds []string
			for _, o := range objs {
				kinds = append(kinds, o.GetKind())
			}
			for _, k := range tc.kinds {
				if !slices.Contains(kinds, k) {
					t.Errorf("no %s rendered (have %v)", k, kinds)
				}
			}
			for _, o := range objs {
				if err := dryRunStrict(o); err != nil {
					t.Errorf("the API server refused %s %s: %v", o.GetKind(), o.GetName(), err)
				}
			}
		})
	}
}

// dryRunStrict has the API server validate obj without storing it, with
// strict field validation (as kubectl and helm ask for): an unknown or
// misspelt field is an error, not a warning.
func dryRunStrict(obj *unstructured.Unstructured) error {
	dc, err := discovery.NewDiscoveryClientForConfig(cluster.Config())
	if err != nil {
		return err
	}
	dyn, err := dynamic.NewForConfig(cluster.Config())
	if err != nil {
		return err
	}
	gvk := obj.GroupVersionKind()
	m, err := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(dc)).RESTMapping(gvk.GroupKind(), gvk.Version)
	if err != nil {
		return err
	}
	var ri dynamic.ResourceInterface = dyn.Resource(m.Resource)
	if m.Scope.Name() == meta.RESTScopeNameNamespace {
		ri = dyn.Resource(m.Resource).Namespace(obj.GetNamespace())
	}
	_, err = ri.Create(context.Background(), obj, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}, FieldValidation: "Strict"})
	if apierrors.IsAlreadyExists(err) { // validated before the name was found taken
		return nil
	}
	return err
}

// The driver's pod meets the PodSecurity "baseline" level except for what
// the driver cannot do without: its one privileged container, and the
// host directories it works in. The real API server's PodSecurity
// admission is the judge: it refuses the pod for exactly those two
// reasons, and accepts the pod without them.
func TestPodSecurityBaselineExceptThePrivilegedDriver(t *testing.T) {
	ctx := context.Background()
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "pss-baseline", Labels: map[string]string{
		"pod-security.kubernetes.io/enforce": "baseline", "pod-security.kubernetes.io/enforce-version": "latest",
	}}}
	if _, err := clients.CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	var ds *unstructured.Unstructured
	objs, err := kube.Decode(render(t, "kustomize", "build", "deploy/kustomize/base"))
	if err != nil {
		t.Fatal(err)
	}
	for _, o := range objs {
		if o.GetKind() == "DaemonSet" {
			ds = o
		}
	}
	if ds == nil {
		t.Fatal("no DaemonSet in the base")
	}
	tmpl, _, _ := unstructured.NestedMap(ds.Object, "spec", "template")
	var pod corev1.Pod
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(tmpl, &pod); err != nil {
		t.Fatal(err)
	}
	pod.Name, pod.Namespace = "driver", ns.Name
	dryRun := metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}}

	_, err = clients.CoreV1().Pods(ns.Name).Create(ctx, pod.DeepCopy(), dryRun)
	if err == nil {
		t.Fatal("a privileged pod passed baseline: is PodSecurity admission on?")
	}
	violations := podSecurityViolations(t, err.Error())
	if !slices.Equal(violations, []string{"hostPath volumes", "privileged"}) {
		t.Errorf("baseline violations %v, want only hostPath volumes and privileged: %v", violations, err)
	}
	if !strings.Contains(err.Error(), `privileged (container "driver" must not set securityContext.privileged=true)`) {
		t.Errorf("a container other than the driver is privileged: %v", err)
	}

	// With the driver unprivileged (and so without Bidirectional
	// propagation) and its host directories replaced, everything else of
	// the pod passes: those two are the only exceptions.
	rest := pod.DeepCopy()
	for i := range rest.Spec.Containers {
		c := &rest.Spec.Containers[i]
		if c.SecurityContext != nil {
			c.SecurityContext.Privileged = nil
		}
		for j := range c.VolumeMounts {
			c.VolumeMounts[j].MountPropagation = nil
		}
	}
	for i, v := range rest.Spec.Volumes {
		if v.HostPath != nil {
			rest.Spec.Volumes[i].VolumeSource = corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}
		}
	}
	if _, err := clients.CoreV1().Pods(ns.Name).Create(ctx, rest, dryRun); err != nil {
		t.Errorf("the rest of the pod does not pass baseline: %v", err)
	}
}

// podSecurityViolations lists the check names in a PodSecurity refusal:
// `violates PodSecurity "baseline:latest": name (details), name (details)`.
func podSecurityViolations(t *testing.T, msg string) []string {
	t.Helper()
	_, list, ok := strings.Cut(msg, `violates PodSecurity "baseline:latest": `)
	if !ok {
		t.Fatalf("not a PodSecurity refusal: %s", msg)
	}
	var names []string
	depth := 0
	var cur bytes.Buffer
	for _, r := range list {
		switch {
		case r == '(':
			depth++
		case r == ')':
			depth--
		case depth == 0 && r == ',':
			names = append(names, strings.TrimSpace(cur.String()))
			cur.Reset()
		case depth == 0:
			cur.WriteRune(r)
		}
	}
	if s := strings.TrimSpace(cur.String()); s != "" {
		names = append(names, s)
	}
	slices.Sort(names)
	return names
}

// helm install and uninstall, as a user runs them, against the API server:
// the SecretProviderClass CRD is left alone where it exists, the
// Credential CRD applied before (as kubectl apply -k does) is taken over
// with --take-ownership, every object is created, NOTES render with the
// release's names, and uninstall leaves only the CRDs (test/chart follows
// the Credential CRD through upgrades).
func TestHelmInstallAndUninstall(t *testing.T) {
	helm, err := kube.Tool("helm")
	if err != nil {
		t.Fatal(err)
	}
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["test"] = &clientcmdapi.Cluster{Server: cluster.URL, CertificateAuthorityData: cluster.CAPEM}
	cfg.AuthInfos["admin"] = &clientcmdapi.AuthInfo{Token: kube.AdminToken}
	cfg.Contexts["test"] = &clientcmdapi.Context{Cluster: "test", AuthInfo: "admin"}
	cfg.CurrentContext = "test"
	dir := t.TempDir()
	kubeconfig := filepath.Join(dir, "kubeconfig")
	if err := clientcmd.WriteToFile(*cfg, kubeconfig); err != nil {
		t.Fatal(err)
	}
	run := func(args ...string) string {
		t.Helper()
		cmd := exec.Command(helm, args...)
		cmd.Dir = repoRoot
		cmd.Env = append(os.Environ(), "KUBECONFIG="+kubeconfig, "HELM_CACHE_HOME="+dir, "HELM_CONFIG_HOME="+dir, "HELM_DATA_HOME="+dir)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("helm %v: %v\n%s", args, err, out)
		}
		return string(out)
	}
	ctx := context.Background()
	const ns, name = "esc-helm", "esc-helm-test"
	if _, err := clients.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	out := run("install", "esc", "deploy/helm/ephemeral-secrets-csi", "-n", ns, "--take-ownership",
		"--set", "fullnameOverride="+name+",providers.vault.enabled=true")
	for _, want := range []string{"rollout status daemonset/" + name, "-l app.kubernetes.io/instance=esc", "audiences vault"} {
		if !strings.Contains(out, want) {
			t.Errorf("NOTES lack %q:\n%s", want, out)
		}
	}
	if _, err := clients.AppsV1().DaemonSets(ns).Get(ctx, name, metav1.GetOptions{}); err != nil {
		t.Errorf("DaemonSet: %v", err)
	}
	csi, err := clients.StorageV1().CSIDrivers().Get(ctx, "ephemeral-secrets.csi.dev", metav1.GetOptions{})
	if err != nil {
		t.Fatalf("CSIDriver: %v", err)
	}
	// Token delivery is csiDriver.tokensInSecrets (default false), not
	// what helm sees of the cluster.
	if p := csi.Spec.ServiceAccountTokenInSecrets; p != nil || len(csi.Spec.TokenRequests) != 1 {
		t.Errorf("CSIDriver spec %+v", csi.Spec)
	}
	for _, role := range []string{name, name + "-edit", name + "-view"} {
		if _, err := clients.RbacV1().ClusterRoles().Get(ctx, role, metav1.GetOptions{}); err != nil {
			t.Errorf("ClusterRole %s: %v", role, err)
		}
	}

	// No hooks: this API server has no controller to run the uninstall
	// hook's Job (test/realcluster runs it).
	run("uninstall", "esc", "-n", ns, "--wait", "--no-hooks")
	if _, err := clients.StorageV1().CSIDrivers().Get(ctx, "ephemeral-secrets.csi.dev", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Errorf("CSIDriver after uninstall: %v", err)
	}
	if _, err := clients.AppsV1().DaemonSets(ns).Get(ctx, name, metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Errorf("DaemonSet after uninstall: %v", err)
	}
	for _, role := range []string{name, name + "-edit", name + "-view"} {
		if _, err := clients.RbacV1().ClusterRoles().Get(ctx, role, metav1.GetOptions{}); !apierrors.IsNotFound(err) {
			t.Errorf("ClusterRole %s after uninstall: %v", role, err)
		}
	}
	dyn, err := dynamic.NewForConfig(cluster.Config())
	if err != nil {
		t.Fatal(err)
	}
	crd := schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}
	for _, name := range []string{"secretproviderclasses.secrets-store.csi.x-k8s.io", "credentials.ephemeral-secrets.csi.dev"} {
		if _, err := dyn.Resource(crd).Get(ctx, name, metav1.GetOptions{}); err != nil {
			t.Errorf("the CRD %s went with the release: %v", name, err)
		}
	}
}
