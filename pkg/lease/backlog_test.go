package lease

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/lease/revocation"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// listCounter counts the reads of the revocation queue from the store.
type listCounter struct {
	Store
	lists atomic.Int32
}

func (s *listCounter) ListRevocations() ([]revocation.Entry, error) {
	s.lists.Add(1)
	return s.Store.ListRevocations()
}

// The revocation queue is read from the store once, at recovery: not at
// each unpublish, each metrics scrape or each attempt (which made N
// unpublishes during an outage cost O(N^2) decodes), and a backlog left
// by an outage drains once the backend answers.
func TestQueueReadOnceThroughAnOutage(t *testing.T) {
	inTiers(t, time.Hour, testQueueReadOnceThroughAnOutage)
}

func testQueueReadOnceThroughAnOutage(t *testing.T, n *node) {
	ctx := context.Background()
	store := &listCounter{Store: n.store}
	down := &outage{Provider: n.prov}
	m := n.manager(store, down, Options{})
	defer m.Close()
	if err := m.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	const pods = 6
	vols := make([]Volume, pods)
	for i := range vols {
		vols[i] = n.volume(fmt.Sprintf("q%d", i))
		publish(t, m, vols[i])
	}
	down.on.Store(true)
	for _, v := range vols {
		unpublish(t, m, v)
		m.drain(ctx) // every attempt fails
		if s := m.State(); s.RevocationQueue == 0 {
			t.Fatal("the metrics show no queued revocation during the outage")
		}
	}
	if got := m.QueueLength(); got != pods {
		t.Fatalf("%d revocations queued, want %d", got, pods)
	}
	// The backend back, and a restart (the backoff does not outlive it).
	down.on.Store(false)
	m.Close()
	m = n.manager(store, down, Options{})
	defer m.Close()
	if err := m.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	m.drain(ctx)
	if got := m.QueueLength(); got != 0 {
		t.Errorf("%d revocations left once the backend answered", got)
	}
	if alive := n.alive(ctx); len(alive) > 0 {
		t.Errorf("%d roles alive after the backlog drained", len(alive))
	}
	if got := store.lists.Load(); got != 2 {
		t.Errorf("the store's revocation queue was read %d times, want twice (one recovery each)", got)
	}
}

// outage is a provider whose Revoke fails while on.
type outage struct {
	provider.Provider
	on atomic.Bool
}

func (o *outage) Revoke(ctx context.Context, l provider.Lease) error {
	if o.on.Load() {
		return fmt.Errorf("%w: the backend is down", provider.ErrUnavailable)
	}
	return o.Provider.Revoke(ctx, l)
}
