package lease

import (
	"context"
	"sync"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/audit"
	"github.com/ephemeral-secrets/csi-driver/pkg/lease/revocation"
	"github.com/ephemeral-secrets/csi-driver/pkg/metrics"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// enqueue records the revocation of l durably; the queue's workers run it.
func (m *Manager) enqueue(l provider.Lease, meta Metadata, reason string) error {
	return m.enqueueAfter(l, meta, reason, time.Time{})
}

// enqueueAfter is enqueue for a revocation not to run before notBefore.
func (m *Manager) enqueueAfter(l provider.Lease, meta Metadata, reason string, notBefore time.Time) error {
	if l.ID == "" {
		return nil
	}
	r := revocation.Entry{
		Lease: l, VolumeID: meta.VolumeID, Class: meta.Class, Pod: meta.Pod,
		Reason: reason, Task: meta.TaskOf(l.ID), EnqueuedAt: m.clock.Now().UTC(), NotBefore: notBefore,
	}
	if err := m.revocations.Add(r); err != nil {
		return err
	}
	rec := recordFor(meta, l)
	rec.Detail, rec.Task = reason, r.Task
	m.audit(withStage(rec, audit.Revoke), audit.Pending, nil)
	return nil
}

// Run works the revocation queue and the records outbox, and sweeps for
// volumes whose target vanished on a timer of its own, until ctx is
// cancelled or the manager closed. It returns once the queue's workers
// stopped.
func (m *Manager) Run(ctx context.Context) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(m.ctx, cancel)
	defer stop()
	var wg sync.WaitGroup
	wg.Go(func() { m.revocations.Run(ctx) })
	wg.Go(func() { m.records.Run(ctx) })
	defer wg.Wait()
	sweep := m.clock.NewTicker(m.opts.SweepInterval)
	defer sweep.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-sweep.C():
			m.Sweep(ctx)
		}
	}
}

// State reports the node's lease state for the metrics gauges.
func (m *Manager) State() metrics.State {
	s := metrics.State{LiveLeases: map[string]int{}}
	now := m.clock.Now()
	for _, v := range m.vols.All() {
		meta, exp := v.Meta(), v.Lease().ExpiresAt
		if meta.State == StateWithdrawn {
			continue
		}
		s.LiveLeases[meta.Provider] += 1 + len(meta.Tasks)
		if v.Failures() > 0 {
			s.RenewalFailing++
		}
		if !exp.IsZero() {
			left := max(exp.Sub(now), 0)
			if s.SoonestExpiry == 0 || left < s.SoonestExpiry {
				s.SoonestExpiry = left
			}
		}
	}
	s.RevocationQueue = m.revocations.Len()
	if oldest := m.revocations.Oldest(); !oldest.IsZero() {
		s.OldestRevocation = now.Sub(oldest)
	}
	return s
}

// QueueLength is the number of revocations not yet confirmed.
func (m *Manager) QueueLength() int { return m.revocations.Len() }
