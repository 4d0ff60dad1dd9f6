package cluster

import (
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/ephemeral-secrets/csi-driver/test/kube"
)

// gcpAudience is an installation's workload identity provider, as its
// overlay of the gcp component sets it.
const gcpAudience = "https://iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/esc/providers/kube"

// gcpOverlay builds what the gcp component's comment tells an admin to
// write: the base, the component, the audience.
func gcpOverlay(t *testing.T) []byte {
	t.Helper()
	dir := t.TempDir()
	rel := func(p string) string {
		r, err := filepath.Rel(dir, filepath.Join(repoRoot, p))
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	overlay := "resources: [" + rel("deploy/kustomize/base") + "]\n" +
		"components: [" + rel("deploy/kustomize/components/gcp") + "]\n" + `patches:
  - target: {kind: CSIDriver, name: ephemeral-secrets.csi.dev}
    patch: |-
      - op: replace
        path: /spec/tokenRequests/0/audience
        value: ` + gcpAudience + "\n"
	if err := os.WriteFile(filepath.Join(dir, "kustomization.yaml"), []byte(overlay), 0o600); err != nil {
		t.Fatal(err)
	}
	return render(t, "kustomize", "build", dir)
}

// The kustomize base with the gcp component is the chart's gcp profile:
// its CSIDriver and its DaemonSet have the specs of helm's with
// providers.gcp.enabled and the same audience (the token request, the
// tokens in the volume context), and everything else is the base's.
func TestKustomizeGCPComponentIsTheChartsProfile(t *testing.T) {
	helmObjs, err := kube.Decode(render(t, "helm", "template", "ephemeral-secrets-csi", "deploy/helm/ephemeral-secrets-csi",
		"--namespace", "ephemeral-secrets", "--kube-version", "1.35.0", "--set", "monitoring.enabled=true",
		"--set", "providers.postgres.enabled=true", "--set", "providers.gcp.enabled=true", "--set", "providers.gcp.tokenAudience="+gcpAudience))
	if err != nil {
		t.Fatal(err)
	}
	withGCP, err := kube.Decode(gcpOverlay(t))
	if err != nil {
		t.Fatal(err)
	}
	base, err := kube.Decode(render(t, "kustomize", "build", "deploy/kustomize/base"))
	if err != nil {
		t.Fatal(err)
	}
	find := func(objs []*unstructured.Unstructured, kind, name string) *unstructured.Unstructured {
		for _, o := range objs {
			if o.GetKind() == kind && o.GetName() == name {
				return o
			}
		}
		t.Fatalf("no %s %s", kind, name)
		return nil
	}
	// spec without the label that says who manages the objects (Helm or kustomize).
	spec := func(o *unstructured.Unstructured) any {
		s := o.DeepCopy()
		unstructured.RemoveNestedField(s.Object, "spec", "template", "metadata", "labels", "app.kubernetes.io/managed-by")
		return s.Object["spec"]
	}
	changed := map[string]bool{}
	for _, o := range base {
		got := find(withGCP, o.GetKind(), o.GetName())
		if reflect.DeepEqual(spec(o), spec(got)) && reflect.DeepEqual(o.Object["data"], got.Object["data"]) {
			continue
		}
		changed[o.GetKind()+"/"+o.GetName()] = true
		if want := find(helmObjs, o.GetKind(), o.GetName()); !reflect.DeepEqual(spec(got), spec(want)) {
			t.Errorf("%s %s: the component's spec is not the chart's gcp profile's:\n%v\nwant\n%v", o.GetKind(), o.GetName(), spec(got), spec(want))
		}
	}
	if len(withGCP) != len(base) || len(changed) != 2 || !changed["CSIDriver/ephemeral-secrets.csi.dev"] || !changed["DaemonSet/ephemeral-secrets-csi"] {
		t.Errorf("the component changed %v of %d objects (the base has %d), want the CSIDriver and the DaemonSet", changed, len(withGCP), len(base))
	}
	reqs, _, _ := unstructured.NestedSlice(find(withGCP, "CSIDriver", "ephemeral-secrets.csi.dev").Object, "spec", "tokenRequests")
	if len(reqs) != 1 || reqs[0].(map[string]any)["audience"] != gcpAudience {
		t.Errorf("tokenRequests %v, want the overlay's audience", reqs)
	}
}
