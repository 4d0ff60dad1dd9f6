package gcptest

import (
	"context"
	"errors"
	"hash/crc32"
	"net/http"
	"testing"

	secretmanager "cloud.google.com/go/secretmanager/apiv1"
	"cloud.google.com/go/secretmanager/apiv1/secretmanagerpb"
	"github.com/googleapis/gax-go/v2/apierror"
	"golang.org/x/oauth2"
	"google.golang.org/api/option"
)

// Google's Secret Manager client library (its REST transport, test code
// only) reads versions from the stand-in with a token the external-account
// flow minted, and understands its errors as Google's.
func TestSecretManagerClientLibrary(t *testing.T) {
	s := start(t)
	ctx := context.Background()
	_, fed := federated(t, s)
	hc := &http.Client{Transport: &oauth2.Transport{Source: oauth2.StaticTokenSource(fed), Base: s.Client().Transport}}
	c, err := secretmanager.NewRESTClient(ctx, option.WithEndpoint(s.URL), option.WithHTTPClient(hc))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	name := "projects/proj-a/locations/europe-west1/secrets/db"
	s.AddVersion(name, []byte("first"))
	s.AddVersion(name, []byte("second"))
	s.SetAlias(name, "stable", 1)
	access := func(version string) (*secretmanagerpb.AccessSecretVersionResponse, int) {
		resp, err := c.AccessSecretVersion(ctx, &secretmanagerpb.AccessSecretVersionRequest{Name: name + "/versions/" + version})
		var ae *apierror.APIError
		if errors.As(err, &ae) {
			return nil, ae.HTTPCode()
		}
		if err != nil {
			t.Fatalf("%s: %v", version, err)
		}
		return resp, http.StatusOK
	}
	if _, code := access("latest"); code != http.StatusForbidden {
		t.Errorf("without secretAccessor: HTTP %d, want 403", code)
	}
	s.GrantAccess(name, s.Principal("team-a", "app"))
	for version, want := range map[string]string{"latest": "second", "1": "first", "stable": "first"} {
		resp, code := access(version)
		if code != http.StatusOK || string(resp.GetPayload().GetData()) != want {
			t.Errorf("%s: HTTP %d %q, want %q", version, code, resp.GetPayload().GetData(), want)
			continue
		}
		if got := resp.GetPayload().GetDataCrc32C(); got != int64(crc32.Checksum([]byte(want), crc32.MakeTable(crc32.Castagnoli))) {
			t.Errorf("%s: dataCrc32c %d does not match", version, got)
		}
	}
	if _, code := access("7"); code != http.StatusNotFound {
		t.Errorf("a version that does not exist: HTTP %d, want 404", code)
	}
	if n := s.Calls(Access); n != 5 {
		t.Errorf("versions.access calls = %d, want 5", n)
	}
}
