package issuer

import (
	"context"
	"fmt"
	"testing"

	pgengine "github.com/ephemeral-secrets/csi-driver/pkg/issuer/postgres"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider/postgres"
)

// BenchmarkIssueAndRevoke is a publish's backend work and its revocation
// through the in-process issuer (password, SCRAM verifier, the issuer's
// decisions, one creating transaction with the tag; then the drop).
func BenchmarkIssueAndRevoke(b *testing.B) {
	for _, via := range []string{"issuer"} {
		b.Run(via, func(b *testing.B) {
			ctx := context.Background()
			cfg := config(map[string]*pgengine.Role{"app": {CreationStatements: []string{create}, MaxLive: 1000,
				Allowed: []pgengine.Subject{{Namespace: "team", ServiceAccount: "app"}}}})
			iss, err := New(Options{Config: cfg})
			if err != nil {
				b.Fatal(err)
			}
			defer iss.Close()
			node := postgres.NewNode(iss.Local())
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
