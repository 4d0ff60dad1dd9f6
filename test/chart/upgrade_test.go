package chart

import (
	"archive/tar"
	"compress/gzip"
	"context"
	"errors"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/yaml"

	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/kube"
)

// The chart as it was before its Credential CRD became a template (the
// CRD in crds/): `git archive --prefix=ephemeral-secrets-csi/
// -o test/chart/testdata/chart-9182170.tgz 9182170:deploy/helm/ephemeral-secrets-csi`.
// A file, not git history, so that a clone without history runs the test;
// TestPreviousChartIsThatCommit checks it where the history is there.
const (
	previousChart  = "testdata/chart-9182170.tgz"
	previousCommit = "9182170"
)

const (
	credentialCRD     = "credentials.ephemeral-secrets.csi.dev"
	spcCRD            = "secretproviderclasses.secrets-store.csi.x-k8s.io"
	credentialCRDFile = "files/crds/ephemeral-secrets.csi.dev_credentials.yaml"
)

var (
	crdResource        = schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}
	credentialResource = schema.GroupVersionResource{Group: "ephemeral-secrets.csi.dev", Version: "v1alpha1", Resource: "credentials"}
	spcResource        = schema.GroupVersionResource{Group: "secrets-store.csi.x-k8s.io", Version: "v1", Resource: "secretproviderclasses"}
)

// The chart renders the Credential CRD that make generate wrote, its
// schema untouched by the template, and marks it to be kept.
func TestCredentialCRDIsTheGeneratedOne(t *testing.T) {
	crd, ok := render(t)["CustomResourceDefinition/"+credentialCRD]
	if !ok {
		t.Fatal("the chart renders no Credential CRD")
	}
	data, err := os.ReadFile(filepath.Join(chartDir, credentialCRDFile))
	if err != nil {
		t.Fatal(err)
	}
	var generated map[string]any
	if err := yaml.Unmarshal(data, &generated); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(crd.Object["spec"], generated["spec"]) {
		t.Error("the rendered CRD's spec differs from the generated file's")
	}
	a := crd.GetAnnotations()
	if a["helm.sh/resource-policy"] != "keep" {
		t.Errorf("annotations %v: no helm.sh/resource-policy: keep", a)
	}
	if a["controller-gen.kubebuilder.io/version"] == "" {
		t.Errorf("annotations %v: the generator's version is lost", a)
	}
	if crd.GetLabels()["app.kubernetes.io/instance"] != "esc" {
		t.Errorf("labels %v: not the chart's", crd.GetLabels())
	}
}

// testdata's previous chart is the chart of previousCommit, file for file.
func TestPreviousChartIsThatCommit(t *testing.T) {
	root := filepath.Join(chartDir, "..", "..", "..")
	const dir = "deploy/helm/ephemeral-secrets-csi"
	git := func(args ...string) ([]byte, error) {
		return exec.Command("git", append([]string{"-C", root}, args...)...).Output()
	}
	if _, err := git("cat-file", "-e", previousCommit+"^{commit}"); err != nil {
		t.Skipf("commit %s is not in this clone's history (a shallow clone?): the archive is taken as it is", previousCommit)
	}
	list, err := git("ls-tree", "-r", "--name-only", previousCommit, "--", dir)
	if err != nil {
		t.Fatal(err)
	}
	archived := archiveFiles(t, previousChart)
	var want []string
	for _, p := range strings.Fields(string(list)) {
		rel := strings.TrimPrefix(p, dir+"/")
		want = append(want, rel)
		content, err := git("show", previousCommit+":"+p)
		if err != nil {
			t.Fatal(err)
		}
		if got, ok := archived[rel]; !ok {
			t.Errorf("%s: not in %s", rel, previousChart)
		} else if got != string(content) {
			t.Errorf("%s differs from %s's", rel, previousCommit)
		}
	}
	for rel := range archived {
		if !slices.Contains(want, rel) {
			t.Errorf("%s: in %s, not in %s", rel, previousChart, previousCommit)
		}
	}
}

// archiveFiles maps each file of a chart archive (its path under the
// chart's directory) to its content.
func archiveFiles(t *testing.T, name string) map[string]string {
	t.Helper()
	f, err := os.Open(name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	gz, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	files := map[string]string{}
	tr := tar.NewReader(gz)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return files
		} else if err != nil {
			t.Fatal(err)
		}
		if h.Typeflag != tar.TypeReg {
			continue
		}
		data, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		_, rel, _ := strings.Cut(path.Clean(h.Name), "/")
		files[rel] = string(data)
	}
}

// helm upgrade from the chart before this change brings the Credential
// CRD under the release (once, with --take-ownership: Helm will not take
// an object it did not create without being told); later upgrades change
// its schema in place, with the live records intact and readable; a
// rollback to the old chart, uninstall and a reinstall keep the CRD and
// every record. The SecretProviderClass CRD, which another chart may own,
// is never touched after it was created.
func TestHelmUpgradeUpdatesTheCredentialCRD(t *testing.T) {
	ctx := context.Background()
	c, err := kube.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Stop)
	dyn, err := dynamic.NewForConfig(c.Config())
	if err != nil {
		t.Fatal(err)
	}
	clients, err := kubernetes.NewForConfig(c.Config())
	if err != nil {
		t.Fatal(err)
	}
	helmAt := helmOn(t, c)
	helmOK := func(args ...string) string {
		t.Helper()
		out, err := helmAt(args...)
		if err != nil {
			t.Fatalf("helm %v: %v\n%s", args, err, out)
		}
		return out
	}
	crds := dyn.Resource(crdResource)
	getCRD := func(name string) *unstructured.Unstructured {
		t.Helper()
		crd, err := crds.Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			t.Fatalf("CRD %s: %v", name, err)
		}
		return crd
	}
	const ns, app = "ephemeral-secrets", "app"
	for _, n := range []string{ns, app} {
		if _, err := clients.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: n}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}

	// The previous chart installs both CRDs from crds/: no keep, no owner.
	helmOK("install", "esc", previousChart, "-n", ns)
	if a := getCRD(credentialCRD).GetAnnotations(); a["helm.sh/resource-policy"] != "" || a["meta.helm.sh/release-name"] != "" {
		t.Fatalf("the previous chart's Credential CRD has annotations %v: not the crds/ chart", a)
	}
	// Another chart (secrets-store-csi-driver) makes the SecretProviderClass CRD its own.
	spc := getCRD(spcCRD)
	spc.SetLabels(map[string]string{"app.kubernetes.io/managed-by": "secrets-store-csi-driver"})
	if spc, err = crds.Update(ctx, spc, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	spcVersion := spc.GetResourceVersion()

	// Live records, written as the issuer writes them (its account, the
	// chart's RBAC and admission policies): two Credentials held by its
	// finalizer, one with a status; and a class.
	issuerCfg := rest.CopyConfig(c.Config())
	issuerCfg.Impersonate.UserName = "system:serviceaccount:" + ns + ":ephemeral-secrets-csi-issuer"
	issuer, err := dynamic.NewForConfig(issuerCfg)
	if err != nil {
		t.Fatal(err)
	}
	creds, issuerCreds := dyn.Resource(credentialResource).Namespace(app), issuer.Resource(credentialResource).Namespace(app)
	for _, name := range []string{"cred-a", "cred-b"} {
		cred := credential(name)
		harness.Eventually(t, 30*time.Second, "the Credential CRD served", func() (bool, error) {
			_, err := issuerCreds.Create(ctx, cred, metav1.CreateOptions{})
			return err == nil, err
		})
	}
	a, err := issuerCreds.Get(ctx, "cred-a", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := unstructured.SetNestedMap(a.Object, map[string]any{"state": "Issued", "expiresAt": "2030-01-01T00:00:00Z"}, "status"); err != nil {
		t.Fatal(err)
	}
	if _, err := issuerCreds.UpdateStatus(ctx, a, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	class := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "secrets-store.csi.x-k8s.io/v1", "kind": "SecretProviderClass",
		"metadata": map[string]any{"name": "db"},
		"spec":     map[string]any{"provider": "ephemeral-secrets", "parameters": map[string]any{"role": "app"}},
	}}
	harness.Eventually(t, 30*time.Second, "the SecretProviderClass CRD served", func() (bool, error) {
		_, err := dyn.Resource(spcResource).Namespace(app).Create(ctx, class, metav1.CreateOptions{})
		return err == nil, err
	})
	records := snapshot(t, creds)
	if len(records) != 2 || records["cred-a"].State != "Issued" {
		t.Fatalf("records %+v", records)
	}
	intact := func(step string) {
		t.Helper()
		if got := snapshot(t, creds); !reflect.DeepEqual(got, records) {
			t.Errorf("%s: Credentials %+v, want %+v", step, got, records)
		}
		// A CRD being deleted deletes its records first; the finalizers
		// hold them (and so the CRD) in Terminating.
		if getCRD(credentialCRD).GetDeletionTimestamp() != nil {
			t.Errorf("%s: the Credential CRD is being deleted", step)
		}
		if v := getCRD(spcCRD).GetResourceVersion(); v != spcVersion {
			t.Errorf("%s: the SecretProviderClass CRD was changed (resourceVersion %s, was %s)", step, v, spcVersion)
		}
		if _, err := dyn.Resource(spcResource).Namespace(app).Get(ctx, "db", metav1.GetOptions{}); err != nil {
			t.Errorf("%s: SecretProviderClass: %v", step, err)
		}
	}
	const field = "upgradeProbe"
	if probe(t, issuerCreds, field) {
		t.Fatalf("status.%s was stored before any CRD had it: the API server prunes nothing, and the check below proves nothing", field)
	}

	// A plain upgrade stops before changing anything: the CRD is not the release's.
	before := getCRD(credentialCRD).GetResourceVersion()
	out, err := helmAt("upgrade", "esc", chartDir, "-n", ns, "--set", "providers.postgres.enabled=true")
	if err == nil {
		t.Fatal("helm upgrade took over a Credential CRD it had not created, without --take-ownership")
	}
	if !strings.Contains(out, credentialCRD) || !strings.Contains(out, "invalid ownership metadata") {
		t.Errorf("helm upgrade failed, not for the CRD's owner:\n%s", out)
	}
	if v := getCRD(credentialCRD).GetResourceVersion(); v != before {
		t.Error("the refused upgrade changed the Credential CRD")
	}
	intact("after the refused upgrade")

	// Once with --take-ownership: the CRD is the release's, marked keep.
	helmOK("upgrade", "esc", chartDir, "-n", ns, "--take-ownership", "--set", "providers.postgres.enabled=true")
	crd := getCRD(credentialCRD)
	if a := crd.GetAnnotations(); a["helm.sh/resource-policy"] != "keep" || a["meta.helm.sh/release-name"] != "esc" || a["meta.helm.sh/release-namespace"] != ns {
		t.Errorf("after --take-ownership the Credential CRD has annotations %v", a)
	}
	intact("after the upgrade that took the CRD")

	// A chart whose CRD has one more status field: a plain upgrade serves it.
	helmOK("upgrade", "esc", chartWithStatusField(t, field), "-n", ns, "--set", "providers.postgres.enabled=true")
	if !slices.Contains(statusFields(t, getCRD(credentialCRD)), field) {
		t.Errorf("the upgraded CRD's status has %v, no %s", statusFields(t, getCRD(credentialCRD)), field)
	}
	harness.Eventually(t, 30*time.Second, "status."+field+" stored", func() (bool, error) { return probe(t, issuerCreds, field), nil })
	intact("after the upgrade that added a field")

	// Rollback to the crds/ chart, whose manifest has no Credential CRD: kept.
	helmOK("rollback", "esc", "1", "-n", ns)
	if now := getCRD(credentialCRD); now.GetUID() != crd.GetUID() || !slices.Contains(statusFields(t, now), field) {
		t.Error("the rollback changed the Credential CRD")
	}
	intact("after the rollback to the previous chart")

	// Back to this chart, no flag (the CRD still names the release): the
	// schema is this chart's again.
	helmOK("upgrade", "esc", chartDir, "-n", ns, "--set", "providers.postgres.enabled=true")
	if fields := statusFields(t, getCRD(credentialCRD)); slices.Contains(fields, field) {
		t.Errorf("after the upgrade back the CRD's status still has %s: %v", field, fields)
	}
	intact("after the upgrade back")

	// Uninstall keeps the CRD and the records, and says so.
	out = helmOK("uninstall", "esc", "-n", ns, "--wait", "--timeout", "1m", "--no-hooks") // no controller runs the hook Job here
	if !strings.Contains(out, "kept due to the resource policy") || !strings.Contains(out, credentialCRD) {
		t.Errorf("helm uninstall does not say it kept the CRD:\n%s", out)
	}
	if _, err := clients.StorageV1().CSIDrivers().Get(ctx, "ephemeral-secrets.csi.dev", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Errorf("the CSIDriver after uninstall: %v (was the release uninstalled?)", err)
	}
	if getCRD(credentialCRD).GetUID() != crd.GetUID() {
		t.Error("the Credential CRD was replaced")
	}
	intact("after uninstall")

	// A new install of the same release takes the kept CRD back, no flag.
	helmOK("install", "esc", chartDir, "-n", ns, "--set", "providers.postgres.enabled=true")
	if getCRD(credentialCRD).GetUID() != crd.GetUID() {
		t.Error("the reinstall replaced the Credential CRD")
	}
	intact("after the reinstall")
}

// helmOn returns a runner of the real helm against cluster c, as its
// admin, with helm's own state in a temporary directory.
func helmOn(t *testing.T, c *kube.Cluster) func(args ...string) (string, error) {
	t.Helper()
	bin, err := kube.Tool("helm")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	kubeconfig := filepath.Join(dir, "kubeconfig")
	if err := c.Kubeconfig(kubeconfig, c.URL, kube.AdminToken); err != nil {
		t.Fatal(err)
	}
	return func(args ...string) (string, error) {
		cmd := exec.Command(bin, args...)
		cmd.Env = append(os.Environ(), "KUBECONFIG="+kubeconfig, "HELM_CACHE_HOME="+dir, "HELM_CONFIG_HOME="+dir, "HELM_DATA_HOME="+dir)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
}

// credential is a Credential record of a pod in namespace app.
func credential(name string) *unstructured.Unstructured {
	return &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "ephemeral-secrets.csi.dev/v1alpha1", "kind": "Credential",
		"metadata": map[string]any{"name": name, "finalizers": []any{"ephemeral-secrets.csi.dev/revoke"}},
		"spec": map[string]any{
			"class": "app/db", "leaseID": name, "node": "node-1", "provider": "postgres", "role": "db/app",
			"pod": map[string]any{"name": "web-" + name, "uid": "uid-" + name, "serviceAccount": "web"},
		},
	}}
}

// record is what a test compares of a Credential.
type record struct {
	UID        string
	Spec       map[string]any
	State      string
	ExpiresAt  string
	Finalizers []string
	Deleting   bool
}

// snapshot reads every Credential, by name.
func snapshot(t *testing.T, creds dynamic.ResourceInterface) map[string]record {
	t.Helper()
	list, err := creds.List(context.Background(), metav1.ListOptions{})
	if err != nil {
		t.Fatalf("listing Credentials: %v", err)
	}
	m := map[string]record{}
	for _, c := range list.Items {
		spec, _, _ := unstructured.NestedMap(c.Object, "spec")
		state, _, _ := unstructured.NestedString(c.Object, "status", "state")
		expires, _, _ := unstructured.NestedString(c.Object, "status", "expiresAt")
		m[c.GetName()] = record{UID: string(c.GetUID()), Spec: spec, State: state, ExpiresAt: expires, Finalizers: c.GetFinalizers(),
			Deleting: c.GetDeletionTimestamp() != nil}
	}
	return m
}

// probe writes status.<field> of cred-a and reports whether the API
// server stored it (it prunes a field its schema lacks).
func probe(t *testing.T, creds dynamic.ResourceInterface, field string) bool {
	t.Helper()
	ctx := context.Background()
	cred, err := creds.Get(ctx, "cred-a", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := unstructured.SetNestedField(cred.Object, "written", "status", field); err != nil {
		t.Fatal(err)
	}
	if _, err := creds.UpdateStatus(ctx, cred, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if cred, err = creds.Get(ctx, "cred-a", metav1.GetOptions{}); err != nil {
		t.Fatal(err)
	}
	v, _, _ := unstructured.NestedString(cred.Object, "status", field)
	return v == "written"
}

// statusFields lists the properties of the status of a CRD's first version.
func statusFields(t *testing.T, crd *unstructured.Unstructured) []string {
	t.Helper()
	versions, _, _ := unstructured.NestedSlice(crd.Object, "spec", "versions")
	if len(versions) == 0 {
		t.Fatalf("CRD %s has no versions", crd.GetName())
	}
	props, _, _ := unstructured.NestedMap(versions[0].(map[string]any), "schema", "openAPIV3Schema", "properties", "status", "properties")
	var names []string
	for n := range props {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

// chartWithStatusField copies the chart to a temporary directory with one
// more string field in its Credential CRD's status: the schema change an
// upgrade must bring.
func chartWithStatusField(t *testing.T, field string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "ephemeral-secrets-csi")
	if err := os.CopyFS(dir, os.DirFS(chartDir)); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(dir, credentialCRDFile)
	data, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var crd unstructured.Unstructured
	if err := yaml.Unmarshal(data, &crd.Object); err != nil {
		t.Fatal(err)
	}
	versions, _, _ := unstructured.NestedSlice(crd.Object, "spec", "versions")
	if len(versions) == 0 {
		t.Fatalf("%s has no versions", file)
	}
	v := versions[0].(map[string]any)
	at := []string{"schema", "openAPIV3Schema", "properties", "status", "properties", field}
	if err := unstructured.SetNestedMap(v, map[string]any{"type": "string", "description": "A field the next chart adds."}, at...); err != nil {
		t.Fatal(err)
	}
	if err := unstructured.SetNestedSlice(crd.Object, versions, "spec", "versions"); err != nil {
		t.Fatal(err)
	}
	if data, err = yaml.Marshal(crd.Object); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(file, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}
