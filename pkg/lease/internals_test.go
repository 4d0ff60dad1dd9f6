package lease

import (
	"context"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// The tests reach the manager's internals only here: what no exported
// method does synchronously in the test's goroutine (a renewal, a pass of
// the revocation queue or of the records outbox, which the crash
// enumeration must run where a panicking store stops it) or sets up a
// lease's age. A restructuring of the manager's internals changes these
// lines, not the tests.

// drain tries every revocation due now once, in the test's goroutine.
func (m *Manager) drain(ctx context.Context) { m.revocations.RevokeDue(ctx) }

// drainRecords makes every due records call once, in the test's goroutine.
func (m *Manager) drainRecords(ctx context.Context) time.Duration { return m.records.Flush(ctx) }

// renewNow runs the volume's renewal, as its timer would, in the test's
// goroutine.
func (m *Manager) renewNow(id string) { m.renew(id) }

// expireIn moves the expiry of the volume's lease, as the manager knows
// it, to d from the manager's now (negative: lapsed); it returns the
// lease's ID and the expiry it had.
func (m *Manager) expireIn(id string, d time.Duration) (leaseID string, was time.Time) {
	m.changeLease(id, func(l *provider.Lease) {
		leaseID, was = l.ID, l.ExpiresAt
		l.ExpiresAt = m.clock.Now().Add(d)
	})
	return leaseID, was
}

// ageBy moves the expiry of the volume's lease, as the manager knows it,
// d earlier: d of its TTL has gone by as far as a renewal is concerned.
func (m *Manager) ageBy(id string, d time.Duration) {
	m.changeLease(id, func(l *provider.Lease) { l.ExpiresAt = l.ExpiresAt.Add(-d) })
}

// changeLease changes the volume's lease as the manager holds it, under
// the volume's lock, as only its holder may; the rest of its state stays.
func (m *Manager) changeLease(id string, change func(*provider.Lease)) {
	h, err := m.vols.Lock(context.Background(), id)
	if err != nil {
		panic(err)
	}
	defer h.Unlock()
	v := h.Volume()
	l, failures := v.Lease(), v.Failures()
	change(&l)
	v.Install(h, v.Meta(), l, v.Granted())
	for range failures {
		v.Failed(h)
	}
}

// renewalState is the volume's count of failed renewals in a row and
// when its next renewal is due.
func (m *Manager) renewalState(id string) (failures int, renewAt time.Time) {
	v := m.vols.Get(id)
	return v.Failures(), v.RenewAt()
}

// currentLease is the volume's lease as the manager holds it (its
// expiry to the nanosecond, which the records calls carry).
func (m *Manager) currentLease(id string) provider.Lease { return m.vols.Get(id).Lease() }

// waitFor returns once no operation holds the volume: what was in flight
// has ended.
func (m *Manager) waitFor(ctx context.Context, id string) {
	if h, err := m.vols.Lock(ctx, id); err == nil {
		h.Unlock()
	}
}
