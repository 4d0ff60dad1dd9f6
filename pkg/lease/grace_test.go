package lease

import (
	"context"
	"testing"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/spc"
)

// TestUnpublishEndsTheRotationGrace: a rotated-out lease waits out its
// rotation grace for readers of the old files while its pod runs; once
// the pod's volume is unpublished nobody reads them, and it is revoked at
// once (found in the real cluster: an uninstall within the grace left the
// driver's state and the rotated-out role behind).
func TestUnpublishEndsTheRotationGrace(t *testing.T) {
	inTiers(t, time.Hour, testUnpublishEndsTheRotationGrace)
}

// testUnpublishEndsTheRotationGrace steps the node's clock through the
// grace and works the queue in the test's goroutine (drain).
func testUnpublishEndsTheRotationGrace(t *testing.T, n *node) {
	ctx := context.Background()
	m := n.manager(n.store, n.prov, Options{Clock: n.clk, RotationGrace: time.Hour})
	defer m.Close()
	if err := m.Recover(ctx); err != nil {
		t.Fatal(err)
	}

	v := n.volume("gr1")
	v.Attributes[spc.ClassKey], v.Mount.Class = "db-tasks", "db-tasks" // a class with the lease socket, to rotate now
	publish(t, m, v)
	before, err := m.Info(v.ID)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.RotateNow(ctx, v.ID); err != nil {
		t.Fatal(err)
	}
	old := n.credential(before.LeaseID)
	// Within the grace the old credential lives, though its revocation is
	// queued. (Not 30 minutes: the new lease's renewal is due then, its
	// margin before expiry the grace capped at half its TTL.)
	n.clk.Step(29 * time.Minute)
	m.drain(ctx)
	if !n.alive(ctx)[old] {
		t.Fatal("the rotated-out credential was revoked within its grace while the pod ran")
	}
	if m.QueueLength() != 1 {
		t.Fatalf("%d revocations queued, want the rotated-out lease's", m.QueueLength())
	}
	unpublish(t, m, v)
	m.drain(ctx)
	if c := n.podCredentials("gr1"); c != 0 {
		t.Errorf("%d credentials of the unpublished pod alive after the queue drained", c)
	}
}
