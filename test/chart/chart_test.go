// Package chart checks what the Helm chart renders: its defaults, a
// values file that sets every value (each must reach the objects), the
// schema's refusal of unknown keys, and the Kubernetes-version rules of
// the CSIDriver. helm is the real one (make kube installs it); the API
// server's view of the same objects is in test/cluster.
package chart

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	storagev1 "k8s.io/api/storage/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"sigs.k8s.io/yaml"

	"github.com/ephemeral-secrets/csi-driver/test/kube"
)

var chartDir = filepath.Join("..", "..", "deploy", "helm", "ephemeral-secrets-csi")

// helm runs the real helm with args and returns its output and error.
func helm(t *testing.T, args ...string) (string, error) {
	t.Helper()
	bin, err := kube.Tool("helm")
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(bin, args...).CombinedOutput()
	return string(out), err
}

// objects is a rendering, by kind and name.
type objects map[string]*unstructured.Unstructured

// render is `helm template` of the chart in namespace ephemeral-secrets
// for the Kubernetes version of the tests' node (test/kube/versions;
// unless args say otherwise), failing the test on error.
func render(t *testing.T, args ...string) objects {
	t.Helper()
	node, _ := kube.Versions()
	all := append([]string{"template", "esc", chartDir, "--namespace", "ephemeral-secrets", "--kube-version", node}, args...)
	out, err := helm(t, all...)
	if err != nil {
		t.Fatalf("helm %v: %v\n%s", all, err, out)
	}
	objs, err := kube.Decode([]byte(out))
	if err != nil {
		t.Fatal(err)
	}
	m := objects{}
	for _, o := range objs {
		m[o.GetKind()+"/"+o.GetName()] = o
	}
	return m
}

// into converts the object kind/name to a typed API object.
func into[T any](t *testing.T, objs objects, key string) *T {
	t.Helper()
	u, ok := objs[key]
	if !ok {
		t.Fatalf("no %s rendered; have %v", key, keysOf(objs))
	}
	var v T
	if err := runtime.DefaultUnstructuredConverter.FromUnstructuredWithValidation(u.Object, &v, true); err != nil {
		t.Fatalf("%s: %v", key, err)
	}
	return &v
}

func keysOf(objs objects) []string {
	var ks []string
	for k := range objs {
		ks = append(ks, k)
	}
	slices.Sort(ks)
	return ks
}

func container(t *testing.T, ds *appsv1.DaemonSet, name string) corev1.Container {
	t.Helper()
	for _, c := range ds.Spec.Template.Spec.Containers {
		if c.Name == name {
			return c
		}
	}
	t.Fatalf("no container %q", name)
	return corev1.Container{}
}

func appVersion(t *testing.T) string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(chartDir, "Chart.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var c struct {
		AppVersion string `json:"appVersion"`
	}
	if err := yaml.Unmarshal(data, &c); err != nil {
		t.Fatal(err)
	}
	if c.AppVersion == "" || c.AppVersion == "dev" {
		t.Fatalf("Chart.yaml appVersion %q is not a release", c.AppVersion)
	}
	return c.AppVersion
}

func hostPaths(ds *appsv1.DaemonSet) map[string]string {
	m := map[string]string{}
	for _, v := range ds.Spec.Template.Spec.Volumes {
		if v.HostPath != nil {
			m[v.Name] = v.HostPath.Path
		}
	}
	return m
}

func TestDefaults(t *testing.T) {
	objs := render(t)
	ds := into[appsv1.DaemonSet](t, objs, "DaemonSet/ephemeral-secrets-csi")
	driver := container(t, ds, "driver")
	if want := "ghcr.io/ephemeral-secrets/csi-driver:" + appVersion(t); driver.Image != want {
		t.Errorf("driver image %q, want %q (tag = the chart's appVersion)", driver.Image, want)
	}
	if got := ds.Spec.Template.Spec.NodeSelector; got["kubernetes.io/os"] != "linux" || len(got) != 1 {
		t.Errorf("nodeSelector %v, want Linux nodes only", got)
	}
	if n := len(ds.Spec.Template.Spec.Containers); n != 1 {
		t.Errorf("%d containers, want the driver alone (it registers itself with kubelet)", n)
	}
	// Liveness is wired: the driver's own /healthz, on the port it serves.
	if p := driver.LivenessProbe; p == nil || p.HTTPGet == nil || p.HTTPGet.Path != "/healthz" || p.HTTPGet.Port.String() != "metrics" {
		t.Errorf("driver liveness probe %+v, want GET /healthz on port metrics", p)
	}
	if p := driver.ReadinessProbe; p == nil || p.HTTPGet == nil || p.HTTPGet.Path != "/readyz" {
		t.Errorf("driver readiness probe %+v, want GET /readyz", p)
	}
	if !slices.Contains(driver.Args, "--metrics-address=:9810") {
		t.Errorf("driver args %v do not serve the probed port", driver.Args)
	}
	checkRegistration(t, ds, driver, "/var/lib/kubelet")
	// Flags left to the driver's defaults are not passed.
	for _, a := range driver.Args {
		for _, f := range []string{"--max-volume-bytes", "--renew-fraction", "--retry-", "--backend-timeout", "--backend-reload-interval", "--sweep-interval"} {
			if strings.HasPrefix(a, f) {
				t.Errorf("default values pass %s", a)
			}
		}
	}
	// The driver's reach: kubelet's pods directory and its plugin
	// directory, never the whole kubelet directory.
	want := map[string]string{
		"plugin-dir":       "/var/lib/kubelet/plugins/ephemeral-secrets.csi.dev",
		"registration-dir": "/var/lib/kubelet/plugins_registry",
		"pods-dir":         "/var/lib/kubelet/pods",
		"state-dir":        "/run/ephemeral-secrets-csi",
	}
	if got := hostPaths(ds); !mapsEqual(got, want) {
		t.Errorf("hostPath volumes %v, want %v", got, want)
	}
	mounts := map[string]corev1.VolumeMount{}
	for _, m := range driver.VolumeMounts {
		mounts[m.Name] = m
	}
	if m := mounts["pods-dir"]; m.MountPath != "/var/lib/kubelet/pods" || m.MountPropagation == nil || *m.MountPropagation != corev1.MountPropagationBidirectional {
		t.Errorf("pods-dir mount %+v: want %s, Bidirectional (the driver checks targets under --kubelet-dir/pods)", m, "/var/lib/kubelet/pods")
	}
	if !slices.Contains(driver.Args, "--kubelet-dir=/var/lib/kubelet") {
		t.Errorf("driver args %v", driver.Args)
	}
	checkSecurity(t, ds)

	// No provider enabled: no token minted for any pod, so no
	// serviceAccountTokenInSecrets (1.35 and later refuse it without
	// tokenRequests).
	csi := into[storagev1.CSIDriver](t, objs, "CSIDriver/ephemeral-secrets.csi.dev")
	if len(csi.Spec.TokenRequests) != 0 || csi.Spec.ServiceAccountTokenInSecrets != nil {
		t.Errorf("CSIDriver tokenRequests %v, serviceAccountTokenInSecrets %v: want neither by default", csi.Spec.TokenRequests, csi.Spec.ServiceAccountTokenInSecrets)
	}
	if _, ok := objs["ServiceMonitor/ephemeral-secrets-csi"]; ok {
		t.Error("monitoring rendered without monitoring.enabled")
	}
	// Standard labels on every object; selectors without a version.
	for key, o := range objs {
		l := o.GetLabels()
		for _, k := range []string{"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version", "app.kubernetes.io/managed-by", "helm.sh/chart"} {
			if l[k] == "" {
				t.Errorf("%s has no label %s", key, k)
			}
		}
	}
	sel := ds.Spec.Selector.MatchLabels
	if len(sel) != 3 || sel["app.kubernetes.io/name"] != "ephemeral-secrets-csi" || sel["app.kubernetes.io/instance"] != "esc" || sel["app.kubernetes.io/component"] != "node" {
		t.Errorf("selector %v", sel)
	}
	for _, role := range []string{"ClusterRole/ephemeral-secrets-csi-edit", "ClusterRole/ephemeral-secrets-csi-view"} {
		r := into[rbacv1.ClusterRole](t, objs, role)
		if len(r.Rules) != 1 || r.Rules[0].Resources[0] != "secretproviderclasses" {
			t.Errorf("%s rules %v", role, r.Rules)
		}
	}
	edit := into[rbacv1.ClusterRole](t, objs, "ClusterRole/ephemeral-secrets-csi-edit")
	if edit.Labels["rbac.authorization.k8s.io/aggregate-to-admin"] != "true" || edit.Labels["rbac.authorization.k8s.io/aggregate-to-edit"] != "true" || !slices.Contains(edit.Rules[0].Verbs, "create") {
		t.Errorf("edit role %v %v", edit.Labels, edit.Rules)
	}
	view := into[rbacv1.ClusterRole](t, objs, "ClusterRole/ephemeral-secrets-csi-view")
	if view.Labels["rbac.authorization.k8s.io/aggregate-to-view"] != "true" || slices.Contains(view.Rules[0].Verbs, "create") {
		t.Errorf("view role %v %v", view.Labels, view.Rules)
	}
}

// checkSecurity: read-only roots and RuntimeDefault seccomp everywhere;
// only the driver privileged; any other container without capabilities.
func checkSecurity(t *testing.T, ds *appsv1.DaemonSet) {
	t.Helper()
	spec := ds.Spec.Template.Spec
	if sc := spec.SecurityContext; sc == nil || sc.SeccompProfile == nil || sc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Errorf("pod seccomp %+v, want RuntimeDefault", spec.SecurityContext)
	}
	if spec.HostNetwork || spec.HostPID || spec.HostIPC {
		t.Error("the pod shares a host namespace")
	}
	for _, c := range spec.Containers {
		sc := c.SecurityContext
		if sc == nil || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
			t.Errorf("container %s: root filesystem not read-only", c.Name)
			continue
		}
		privileged := sc.Privileged != nil && *sc.Privileged
		if privileged != (c.Name == "driver") {
			t.Errorf("container %s: privileged=%v", c.Name, privileged)
		}
		if !privileged {
			if sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) || len(sc.Capabilities.Add) != 0 {
				t.Errorf("container %s: capabilities %+v, want all dropped", c.Name, sc.Capabilities)
			}
			if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
				t.Errorf("container %s: privilege escalation allowed", c.Name)
			}
		}
	}
}

// subset reports whether every label of a is in b.
func subset(a, b map[string]string) bool {
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return len(a) > 0
}

func mapsEqual(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

// checkRegistration: the driver registers itself with kubelet: it is
// told kubelet's registration directory (mounted from the host) and the
// path of its socket as kubelet sees it.
func checkRegistration(t *testing.T, ds *appsv1.DaemonSet, driver corev1.Container, kubeletDir string) {
	t.Helper()
	for _, a := range []string{"--registration-dir=/registration",
		"--kubelet-registration-path=" + kubeletDir + "/plugins/ephemeral-secrets.csi.dev/csi.sock"} {
		if !slices.Contains(driver.Args, a) {
			t.Errorf("driver args %v lack %s", driver.Args, a)
		}
	}
	mounted := false
	for _, m := range driver.VolumeMounts {
		mounted = mounted || (m.MountPath == "/registration" && hostPaths(ds)[m.Name] == kubeletDir+"/plugins_registry")
	}
	if !mounted {
		t.Errorf("kubelet's plugins_registry is not mounted at /registration: %+v", driver.VolumeMounts)
	}
}

// The node plugins have no way to the PostgreSQL admin credential: no
// volume, environment variable or RBAC rule of the DaemonSet reaches the
// issuer's Secret (or any Secret); only the issuer's pod mounts it.
func TestNodeHasNoPathToTheAdminCredential(t *testing.T) {
	objs := render(t, "--set", "providers.postgres.enabled=true")
	const issuerSecret = "ephemeral-secrets-issuer"
	ds := into[appsv1.DaemonSet](t, objs, "DaemonSet/ephemeral-secrets-csi")
	for _, v := range ds.Spec.Template.Spec.Volumes {
		if v.Secret != nil && (v.Secret.SecretName == issuerSecret || v.Secret.Optional == nil || !*v.Secret.Optional) {
			t.Errorf("DaemonSet volume %s: Secret %s (optional %v): the node needs none while the issuer serves PostgreSQL", v.Name, v.Secret.SecretName, v.Secret.Optional)
		}
		if v.Projected != nil {
			for _, s := range v.Projected.Sources {
				if s.Secret != nil {
					t.Errorf("DaemonSet volume %s projects Secret %s", v.Name, s.Secret.Name)
				}
			}
		}
	}
	for _, c := range ds.Spec.Template.Spec.Containers {
		for _, e := range c.Env {
			if e.ValueFrom != nil && e.ValueFrom.SecretKeyRef != nil {
				t.Errorf("container %s: env %s from Secret %s", c.Name, e.Name, e.ValueFrom.SecretKeyRef.Name)
			}
		}
		for _, e := range c.EnvFrom {
			if e.SecretRef != nil {
				t.Errorf("container %s: env from Secret %s", c.Name, e.SecretRef.Name)
			}
		}
	}
	// RBAC: every role bound to the node plugin's service account.
	nodeSA := ds.Spec.Template.Spec.ServiceAccountName
	checked := 0
	for key, o := range objs {
		kind := o.GetKind()
		if kind != "ClusterRoleBinding" && kind != "RoleBinding" {
			continue
		}
		b := into[rbacv1.RoleBinding](t, objs, key)
		bound := false
		for _, s := range b.Subjects {
			bound = bound || (s.Kind == "ServiceAccount" && s.Name == nodeSA)
		}
		if !bound {
			continue
		}
		role := into[rbacv1.ClusterRole](t, objs, b.RoleRef.Kind+"/"+b.RoleRef.Name)
		checked++
		for _, r := range role.Rules {
			if slices.Contains(r.APIGroups, "") && (slices.Contains(r.Resources, "secrets") || slices.Contains(r.Resources, "*")) {
				t.Errorf("%s grants the node plugin %v on %v", b.RoleRef.Name, r.Verbs, r.Resources)
			}
		}
	}
	if checked < 2 {
		t.Errorf("%d roles bound to %s checked: want its ClusterRole and its Role", checked, nodeSA)
	}
	// The issuer is the one pod with the Secret; it runs without privilege.
	dep := into[appsv1.Deployment](t, objs, "Deployment/ephemeral-secrets-csi-issuer")
	var mounted bool
	for _, v := range dep.Spec.Template.Spec.Volumes {
		mounted = mounted || (v.Secret != nil && v.Secret.SecretName == issuerSecret)
	}
	if !mounted {
		t.Errorf("the issuer does not mount %s", issuerSecret)
	}
	if *dep.Spec.Replicas < 2 {
		t.Errorf("issuer replicas %d: want 2 by default (leader election)", *dep.Spec.Replicas)
	}
	sc := dep.Spec.Template.Spec.SecurityContext
	if sc == nil || sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot {
		t.Errorf("issuer pod security context %+v: want non-root", sc)
	}
	for _, c := range dep.Spec.Template.Spec.Containers {
		csc := c.SecurityContext
		if csc == nil || csc.Privileged != nil && *csc.Privileged || csc.ReadOnlyRootFilesystem == nil || !*csc.ReadOnlyRootFilesystem ||
			csc.Capabilities == nil || !slices.Equal(csc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
			t.Errorf("issuer container %s security context %+v", c.Name, csc)
		}
	}
	np := into[networkingv1.NetworkPolicy](t, objs, "NetworkPolicy/ephemeral-secrets-csi-issuer")
	if len(np.Spec.Ingress) != 2 || len(np.Spec.Ingress[0].From) != 1 || np.Spec.Ingress[0].Ports[0].Port.String() != "https" ||
		!subset(np.Spec.Ingress[0].From[0].PodSelector.MatchLabels, ds.Spec.Template.Labels) {
		t.Errorf("issuer NetworkPolicy ingress %+v: want https from the node plugins only", np.Spec.Ingress)
	}
	svc := into[corev1.Service](t, objs, "Service/ephemeral-secrets-csi-issuer")
	for k, v := range svc.Spec.Selector {
		if dep.Spec.Template.Labels[k] != v {
			t.Errorf("issuer Service selector %v does not select the issuer's pods %v", svc.Spec.Selector, dep.Spec.Template.Labels)
		}
		if k == "app.kubernetes.io/component" && ds.Spec.Template.Labels[k] == v {
			t.Errorf("issuer Service selector %v selects the node plugins", svc.Spec.Selector)
		}
	}
}
