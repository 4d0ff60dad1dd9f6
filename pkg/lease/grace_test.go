package lease

import (
	"context"
	"testing"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider/postgres"
	"github.com/ephemeral-secrets/csi-driver/pkg/spc"
)

// TestUnpublishEndsTheRotationGrace: a rotated-out lease waits out its
// rotation grace for readers of the old files while its pod runs; once
// the pod's volume is unpublished nobody reads them, and it is revoked at
// once (found in the real cluster: an uninstall within the grace left the
// driver's state and the rotated-out role behind).
func TestUnpublishEndsTheRotationGrace(t *testing.T) {
	needPostgres(t)
	n := newNode(t, time.Hour)
	ctx := context.Background()
	m := n.manager(n.store, n.pg, Options{RotationGrace: time.Hour, RetryMin: 50 * time.Millisecond})
	if err := m.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go m.Run(rctx)
	defer m.Close()

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
	old := postgres.RoleName(before.LeaseID)
	// Within the grace the old role lives.
	time.Sleep(300 * time.Millisecond)
	if !n.alive(ctx)[old] {
		t.Fatal("the rotated-out role was dropped within its grace while the pod ran")
	}
	unpublish(t, m, v)
	eventually(t, 10*time.Second, "every role of the unpublished pod dropped", func() bool { return podRoles(n, "gr1") == 0 })
}
