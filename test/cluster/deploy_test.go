package cluster

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

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

func byKey(t *testing.T, streams ...[]byte) map[string]*unstructured.Unstructured {
	t.Helper()
	out := map[string]*unstructured.Unstructured{}
	for _, s := range streams {
		objs, err := kube.Decode(s)
		if err != nil {
			t.Fatal(err)
		}
		for _, o := range objs {
			out[fmt.Sprintf("%s/%s/%s", o.GetKind(), o.GetNamespace(), o.GetName())] = o
		}
	}
	return out
}

func keys(m map[string]*unstructured.Unstructured) []string {
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

// The chart with its defaults and the kustomize base render the same
// objects; so do the chart with monitoring and the monitoring overlay.
// The API server accepts every one of them (a server-side dry run).
func TestHelmAndKustomizeRenderTheSameAcceptedObjects(t *testing.T) {
	chart := filepath.Join("deploy", "helm", "ephemeral-secrets-csi")
	stubs, err := os.ReadFile("testdata/monitoring-crds.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if err := kube.Apply(context.Background(), cluster.Config(), stubs, false); err != nil {
		t.Fatal(err)
	}
	crds := render(t, "kustomize", "build", "deploy/kustomize/crds")
	for _, tc := range []struct {
		name      string
		helmArgs  []string
		kustomize string
	}{
		{"defaults", nil, "deploy/kustomize/base"},
		{"monitoring", []string{"--set", "monitoring.enabled=true"}, "deploy/kustomize/monitoring"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"template", "esc", chart, "--namespace", "ephemeral-secrets", "--include-crds"}, tc.helmArgs...)
			h := byKey(t, render(t, "helm", args...))
			k := byKey(t, render(t, "kustomize", "build", tc.kustomize), crds)
			if !reflect.DeepEqual(keys(h), keys(k)) {
				t.Fatalf("objects differ:\nhelm:      %v\nkustomize: %v", keys(h), keys(k))
			}
			for key, ho := range h {
				if !reflect.DeepEqual(ho.Object, k[key].Object) {
					t.Errorf("%s differs:\nhelm:      %v\nkustomize: %v", key, ho.Object, k[key].Object)
				}
			}
			var stream []string
			for _, key := range keys(h) {
				data, err := h[key].MarshalJSON()
				if err != nil {
					t.Fatal(err)
				}
				stream = append(stream, string(data))
			}
			if err := kube.Apply(context.Background(), cluster.Config(), []byte(strings.Join(stream, "\n")), true); err != nil {
				t.Fatalf("the API server refused a rendered object: %v", err)
			}
		})
	}
}
