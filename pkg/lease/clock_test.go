package lease

import (
	"context"
	"testing"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/audit"
)

// The renewal runs at its point of the lease's TTL on the manager's
// clock: stepped here, not waited for. The ledger's clock is the
// manager's; PostgreSQL's is not: a role issued by the real server after
// the clock was stepped ahead looks overdue at once, so the privileged
// tier checks the first renewal only.
func TestRenewalOnTheInjectedClock(t *testing.T) {
	inTiers(t, time.Hour, testRenewalOnTheInjectedClock)
}

func testRenewalOnTheInjectedClock(t *testing.T, n *node) {
	ctx := context.Background()
	tr := &auditTrail{}
	m := n.manager(n.store, n.prov, Options{Clock: n.clk, Audit: audit.New(tr), RenewFraction: 2.0 / 3})
	defer m.Close()
	if err := m.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	renewed := func() int { return tr.Count(t, audit.Renew, audit.Success) + tr.Count(t, audit.Rotate, audit.Success) }
	v := n.volume("clk")
	publish(t, m, v)
	n.clk.Step(39 * time.Minute) // the renewal point is at 40 minutes (no jitter)
	settle(t, n, m, v.ID)
	if got := renewed(); got != 0 {
		t.Fatalf("%d renewals before the renewal point", got)
	}
	if !m.Published(v.ID) {
		t.Fatal("the volume is gone")
	}
	n.clk.Step(2 * time.Minute)
	eventually(t, 30*time.Second, "a renewal at 2/3 of the TTL", func() bool { return renewed() >= 1 })
	if err := n.login(ctx, v.TargetPath); err != nil {
		t.Errorf("the renewed credential: %v", err)
	}
	if n.tier == "memory" {
		settle(t, n, m, v.ID)
		m.drain(ctx) // a rotated-out credential's revocation
		if got := renewed(); got != 1 {
			t.Errorf("%d renewals at 2/3 of the TTL, want 1", got)
		}
		if c := n.podCredentials("clk"); c != 1 {
			t.Errorf("%d credentials of the pod alive after its renewal, want 1", c)
		}
	}
	unpublish(t, m, v)
	m.drain(ctx)
	if alive := n.alive(ctx); len(alive) > 0 {
		t.Errorf("%d credentials alive after unpublish", len(alive))
	}
}

// settle waits until the volume's renewal is armed in the future of the
// node's clock: a renewal the last step made due has run.
func settle(t *testing.T, n *node, m *Manager, id string) {
	t.Helper()
	eventually(t, 10*time.Second, "the renewal the clock made due has run", func() bool {
		_, at := m.renewalState(id)
		return at.After(n.clk.Now())
	})
}

// TestRenewalTimeline steps a lease through five hours of its life a
// minute at a time, against the ledger (whose clock is the manager's):
// renewed in place at 2/3 of each grant while its maximum TTL allows,
// then rotated to a fresh credential; the pod's files log in at every
// minute, and no more than the one credential is alive once the queue
// has drained.
func TestRenewalTimeline(t *testing.T) {
	const ttl = time.Hour
	n := newMemoryNode(t, ttl)
	ctx := context.Background()
	tr := &auditTrail{}
	m := n.manager(n.store, n.prov, Options{Clock: n.clk, Audit: audit.New(tr)})
	defer m.Close()
	if err := m.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	v := n.volume("timeline")
	publish(t, m, v)
	first, err := m.Info(v.ID)
	if err != nil {
		t.Fatal(err)
	}
	for minute := 1; minute <= 5*60; minute++ {
		n.clk.Step(time.Minute)
		settle(t, n, m, v.ID)
		m.drain(ctx)
		if err := n.login(ctx, v.TargetPath); err != nil {
			t.Fatalf("minute %d: the pod's files do not log in: %v", minute, err)
		}
		if c := n.podCredentials("timeline"); c != 1 {
			t.Fatalf("minute %d: %d credentials of the pod alive, want 1", minute, c)
		}
	}
	renewals, rotations := tr.Count(t, audit.Renew, audit.Success), tr.Count(t, audit.Rotate, audit.Success)
	t.Logf("%d renewals, %d rotations", renewals, rotations)
	// Grants of 1 h renewed after 36 to 40 minutes (the jitter) reach the
	// 4 h maximum after at least 5 renewals; then one rotation starts a
	// fresh lease, whose own maximum is 4 h away.
	if renewals < 5 || rotations != 1 {
		t.Errorf("%d renewals and %d rotations in 5 h of 1 h grants up to 4 h", renewals, rotations)
	}
	if e := tr.expires(t); len(e) > 0 {
		t.Errorf("leases lapsed: %v", e)
	}
	info, _ := m.Info(v.ID)
	if info.LeaseID == first.LeaseID {
		t.Error("the lease past its maximum TTL was not replaced")
	}
	unpublish(t, m, v)
	m.drain(ctx)
	if alive := n.alive(ctx); len(alive) > 0 {
		t.Errorf("%d credentials alive after unpublish", len(alive))
	}
}
