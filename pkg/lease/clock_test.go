package lease

import (
	"context"
	"testing"
	"time"

	clocktesting "k8s.io/utils/clock/testing"

	"github.com/ephemeral-secrets/csi-driver/pkg/audit"
)

// The renewal runs at its point of the lease's TTL on the manager's
// clock: stepped here, not waited for. (A PostgreSQL role is not renewed
// in place: the renewal is a rotation to a fresh role.)
func TestRenewalOnTheInjectedClock(t *testing.T) {
	needPostgres(t)
	ctx := context.Background()
	n := newNode(t, time.Hour)
	clk := clocktesting.NewFakeClock(time.Now())
	tr := &auditTrail{}
	m := n.manager(n.store, n.pg, Options{Clock: clk, Audit: audit.New(tr), RenewFraction: 2.0 / 3})
	defer m.Close()
	if err := m.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	v := n.volume("clk")
	publish(t, m, v)
	clk.Step(39 * time.Minute) // the renewal point is at 40 minutes, less its jitter (none)
	if got := tr.Count(t, audit.Renew, "") + tr.Count(t, audit.Rotate, ""); got != 0 {
		t.Fatalf("%d renewals before the renewal point", got)
	}
	if !m.Published(v.ID) {
		t.Fatal("the volume is gone")
	}
	clk.Step(2 * time.Minute)
	for end := time.Now().Add(30 * time.Second); tr.Count(t, audit.Rotate, audit.Success) != 1; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatalf("no renewal at 2/3 of the TTL: %+v", tr.Records(t))
		}
	}
	if err := login(ctx, v.TargetPath); err != nil {
		t.Errorf("the renewed credential: %v", err)
	}
	unpublish(t, m, v)
	m.drain(ctx)
	if alive := n.alive(ctx); len(alive) > 0 {
		t.Errorf("%d roles alive after unpublish", len(alive))
	}
}
