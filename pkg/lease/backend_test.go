package lease

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/lease/state"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// TestBackendContract holds each tier's backend to what the manager sees
// of PostgreSQL's: the ledger of the unprivileged tier stands in for it
// only as far as it answers the same. An issue gives a credential that
// logs in, named for its lease ID (asked again after a lost answer, the
// issue is refused as unavailable, which makes the manager revoke by ID,
// and the credential is left as it was); a fresh lease's
// renewal does not shorten it; a revocation ends it, is idempotent, and
// accepts a lease that carries only its ID and parameters.
func TestBackendContract(t *testing.T) { inTiers(t, time.Hour, testBackendContract) }

func testBackendContract(t *testing.T, n *node) {
	ctx := context.Background()
	class := n.classes[testNS+"/db"]
	pod := provider.Pod{Namespace: testNS, Name: "contract", UID: "uid-contract", ServiceAccount: "app"}
	issue := func(id string) provider.Lease {
		t.Helper()
		l, err := n.prov.Issue(ctx, provider.Request{LeaseID: id, VolumeID: "csi-contract", Class: class.Ref(), Params: class.Parameters, Pod: pod})
		if err != nil {
			t.Fatalf("issue: %v", err)
		}
		l.ID, l.Provider, l.Params = id, class.Provider, class.Parameters // as the manager records it
		return l
	}
	logsIn := func(l provider.Lease) error { return n.backend.login(ctx, l.Values["username"], l.Values["password"]) }

	id := state.NewLeaseID(pod)
	l := issue(id)
	if l.Values["username"] != n.credential(id) || l.Values["password"] == "" {
		t.Fatalf("issued username %q (want %q) and a password of %d bytes", l.Values["username"], n.credential(id), len(l.Values["password"]))
	}
	if !n.alive(ctx)[n.credential(id)] {
		t.Fatal("the issued credential is not alive")
	}
	if err := logsIn(l); err != nil {
		t.Fatalf("the issued credential: %v", err)
	}
	if ttl := l.ExpiresAt.Sub(l.IssuedAt); l.IssuedAt.IsZero() || ttl < 59*time.Minute || ttl > time.Hour {
		t.Errorf("issued at %s for %s, want an hour", l.IssuedAt, ttl)
	}

	// The first answer was lost: the manager never asks again, but
	// revokes by ID; an issue repeated is refused and changes nothing.
	if _, err := n.prov.Issue(ctx, provider.Request{LeaseID: id, VolumeID: "csi-contract", Class: class.Ref(), Params: class.Parameters, Pod: pod}); !errors.Is(err, provider.ErrUnavailable) {
		t.Errorf("an issue repeated for a live credential: %v, want ErrUnavailable", err)
	}
	if err := logsIn(l); err != nil {
		t.Errorf("the credential after an issue repeated: %v", err)
	}
	again := l

	if r, err := n.prov.Renew(ctx, again); err != nil && !errors.Is(err, provider.ErrNotRenewable) {
		t.Errorf("renewing a fresh lease: %v", err)
	} else if err == nil && r.ExpiresAt.Before(again.ExpiresAt) {
		t.Errorf("a renewal moved the expiry back, from %s to %s", again.ExpiresAt, r.ExpiresAt)
	}

	for i := range 2 {
		if err := n.prov.Revoke(ctx, again); err != nil {
			t.Fatalf("revocation %d: %v", i+1, err)
		}
	}
	if n.alive(ctx)[n.credential(id)] {
		t.Error("the revoked credential is alive")
	}
	if err := logsIn(again); err == nil {
		t.Error("the revoked credential logs in")
	}
	never := state.NewLeaseID(pod) // an issue interrupted before its answer was recorded
	if err := n.prov.Revoke(ctx, provider.Lease{ID: never, Provider: class.Provider, Params: class.Parameters}); err != nil {
		t.Errorf("revoking a lease by its ID alone: %v", err)
	}
}
