package issuer

import (
	"context"
	"fmt"
	"testing"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider/postgres"
)

// BenchmarkIssueAndRevoke is a publish's backend work and its revocation
// through the in-process issuer (password, SCRAM verifier, one creating
// transaction with the tag; then the drop), against the same node side
// over the Admin alone: the difference is what the issuer's decisions
// cost.
func BenchmarkIssueAndRevoke(b *testing.B) {
	for _, via := range []string{"issuer", "admin"} {
		b.Run(via, func(b *testing.B) {
			ctx := context.Background()
			cfg := config(map[string]*postgres.Role{"app": {CreationStatements: []string{create}, MaxLive: 1000,
				Allowed: []postgres.Subject{{Namespace: "team", ServiceAccount: "app"}}}})
			var node *postgres.Provider
			if via == "issuer" {
				iss, err := New(Options{Config: cfg})
				if err != nil {
					b.Fatal(err)
				}
				defer iss.Close()
				node = postgres.NewNode(iss.Local())
			} else {
				a, err := postgres.NewAdmin(cfg, nil)
				if err != nil {
					b.Fatal(err)
				}
				defer a.Close()
				node = postgres.NewNode(a)
			}
			for i := 0; b.Loop(); i++ {
				l, err := issue(ctx, node, fmt.Sprintf("team-b-%s%06d", via, i), appPod("b"))
				if err != nil {
					b.Fatal(err)
				}
				if err := node.Revoke(ctx, provider.Lease{ID: l.ID, Params: l.Params, Handle: l.Handle}); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
