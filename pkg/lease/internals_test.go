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
	m.mu.Lock()
	defer m.mu.Unlock()
	v := m.vols[id]
	was = v.lease.ExpiresAt
	v.lease.ExpiresAt = m.clock.Now().Add(d)
	return v.lease.ID, was
}

// ageBy moves the expiry of the volume's lease, as the manager knows it,
// d earlier: d of its TTL has gone by as far as a renewal is concerned.
func (m *Manager) ageBy(id string, d time.Duration) {
	m.mu.Lock()
	defer m.mu.Unlock()
	v := m.vols[id]
	v.lease.ExpiresAt = v.lease.ExpiresAt.Add(-d)
}

// renewalState is the volume's count of failed renewals in a row and
// when its next renewal is due.
func (m *Manager) renewalState(id string) (failures int, renewAt time.Time) {
	m.mu.Lock()
	defer m.mu.Unlock()
	v := m.vols[id]
	return v.failures, v.renewAt
}

// currentLease is the volume's lease as the manager holds it (its
// expiry to the nanosecond, which the records calls carry).
func (m *Manager) currentLease(id string) provider.Lease {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.vols[id].lease
}

// waitFor returns once no operation holds the volume: what was in flight
// has ended.
func (m *Manager) waitFor(ctx context.Context, id string) {
	if unlock, err := m.locks.Lock(ctx, id); err == nil {
		unlock()
	}
}
