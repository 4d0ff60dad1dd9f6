package v1alpha1_test

import (
	"os"
	"path/filepath"
	"testing"

	"sigs.k8s.io/yaml"

	"github.com/ephemeral-secrets/csi-driver/pkg/credential"
)

// TestSourcesBoundIsTheIssuers checks that the CRD bounds status.sources
// at credential.MaxSources, the issuer's own bound: a smaller one would
// make the API server refuse the status of a credential used from many
// addresses, a larger one a list the issuer never fills.
func TestSourcesBoundIsTheIssuers(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("../../../../deploy/helm/ephemeral-secrets-csi/files/crds", "ephemeral-secrets.csi.dev_credentials.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	// The CRD's few fields this reads (no dependency on apiextensions'
	// types for them).
	type schema struct {
		Properties map[string]schema `json:"properties"`
		MaxItems   *int              `json:"maxItems"`
	}
	var crd struct {
		Spec struct {
			Versions []struct {
				Schema struct {
					OpenAPIV3Schema schema `json:"openAPIV3Schema"`
				} `json:"schema"`
			} `json:"versions"`
		} `json:"spec"`
	}
	if err := yaml.Unmarshal(b, &crd); err != nil {
		t.Fatal(err)
	}
	if len(crd.Spec.Versions) != 1 {
		t.Fatalf("the CRD has %d versions, the test reads one", len(crd.Spec.Versions))
	}
	sources := crd.Spec.Versions[0].Schema.OpenAPIV3Schema.Properties["status"].Properties["sources"]
	if sources.MaxItems == nil || *sources.MaxItems != credential.MaxSources {
		t.Errorf("status.sources has maxItems %v, want credential.MaxSources (%d): change the marker in types.go", sources.MaxItems, credential.MaxSources)
	}
}
