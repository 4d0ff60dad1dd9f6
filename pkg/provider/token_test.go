package provider_test

import (
	"errors"
	"strings"
	"testing"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/test/standin"
)

// Only a token of the pod's own identity is presented: one of another
// service account, namespace or pod is refused, and never quoted.
func TestPodTokenIsThePodsOwn(t *testing.T) {
	pod := provider.Pod{Namespace: "team-a", Name: "p", UID: "uid-1", ServiceAccount: "app"}
	for _, tc := range []struct {
		name  string
		token string
		want  error
	}{
		{"its own", standin.Token("team-a", "app", "uid-1", "vault"), nil},
		{"its own, unbound", standin.Token("team-a", "app", "", "vault"), nil},
		{"another service account", standin.Token("team-a", "admin", "uid-1", "vault"), provider.ErrPermissionDenied},
		{"another namespace", standin.Token("team-b", "app", "uid-1", "vault"), provider.ErrPermissionDenied},
		{"another pod", standin.Token("team-a", "app", "uid-2", "vault"), provider.ErrPermissionDenied},
		{"not a JWT", "SECRET-opaque-token", provider.ErrPermissionDenied},
		{"claims not JSON", "eyJhbGciOiJub25lIn0.U0VDUkVULW5vdC1qc29u.sig", provider.ErrPermissionDenied},
		{"missing", "", provider.ErrPermissionDenied},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req := provider.Request{Pod: pod, Tokens: map[string]provider.Token{"vault": {Token: tc.token}}}
			got, err := provider.PodToken(req, "vault")
			if !errors.Is(err, tc.want) || (err == nil && got != tc.token) {
				t.Fatalf("PodToken = %v, want %v", err, tc.want)
			}
			if err != nil && tc.token != "" && strings.Contains(err.Error(), tc.token) {
				t.Fatalf("the error quotes the token: %v", err)
			}
		})
	}
}
