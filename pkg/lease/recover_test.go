package lease

import (
	"context"
	"testing"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/spc"
)

// renewalWrites signals each metadata write of a renewal or a rotation
// (a renewal counted, or a new lease pending).
type renewalWrites struct {
	Store
	wrote chan struct{}
}

func (s *renewalWrites) WriteMetadata(m Metadata) error {
	err := s.Store.WriteMetadata(m)
	if m.Renewals > 0 || m.PendingLeaseID != "" {
		select {
		case s.wrote <- struct{}{}:
		default:
		}
	}
	return err
}

// socketsDuring runs during inside Open, that is inside the recovery of
// a lease-socket volume, after its renewal was armed.
type socketsDuring struct {
	openSockets
	during func()
}

func (s *socketsDuring) Open(id string, gid int) error {
	s.during()
	return s.openSockets.Open(id, gid)
}

// A renewal a restart finds due fires as soon as recovery arms it; it
// must wait until the volume's recovery is done, which still reads and
// records the volume's lease and metadata (found by the race detector in
// the outage test: recovery read the metadata a lapse was writing).
func TestRecoveryFinishesAVolumeBeforeItsRenewalRuns(t *testing.T) {
	n := newNode(t, time.Minute)
	ctx := context.Background()
	m1 := n.manager(n.store, n.prov, Options{})
	if err := m1.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	v := n.volume("rec")
	v.Attributes[spc.ClassKey], v.Mount.Class = "db-tasks", "db-tasks"
	publish(t, m1, v)
	m1.Close()

	ws := &renewalWrites{Store: n.store, wrote: make(chan struct{}, 1)}
	renewedDuringRecovery := false
	sockets := &socketsDuring{during: func() {
		// Time for a renewal racing the recovery to write; one that waits
		// for the recovery cannot.
		select {
		case <-ws.wrote:
			renewedDuringRecovery = true
		case <-time.After(2 * time.Second):
		}
	}}
	// A renewal point at the very start of the lease: due at once.
	m2 := n.manager(ws, n.prov, Options{Sockets: sockets, RenewFraction: 1e-6, Jitter: 0})
	defer m2.Close()
	if err := m2.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	if renewedDuringRecovery {
		t.Error("the volume's renewal ran while its recovery was not finished")
	}
	select {
	case <-ws.wrote: // the renewal, after the recovery
	case <-time.After(30 * time.Second):
		t.Fatal("the renewal due at the restart never ran")
	}
	unpublish(t, m2, v)
	m2.drain(ctx)
}
