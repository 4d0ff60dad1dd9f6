package lease

import (
	"context"
	"errors"
	"time"

	"k8s.io/klog/v2"

	"github.com/ephemeral-secrets/csi-driver/pkg/audit"
	"github.com/ephemeral-secrets/csi-driver/pkg/metrics"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/storage"
)

// enqueue records the revocation of l durably and wakes the worker.
func (m *Manager) enqueue(l provider.Lease, meta storage.Metadata, reason string) error {
	return m.enqueueAfter(l, meta, reason, time.Time{})
}

// enqueueAfter is enqueue for a revocation not to run before notBefore.
func (m *Manager) enqueueAfter(l provider.Lease, meta storage.Metadata, reason string, notBefore time.Time) error {
	if l.ID == "" {
		return nil
	}
	r := storage.Revocation{
		Lease: l, VolumeID: meta.VolumeID, Class: meta.Class, Pod: meta.Pod,
		Reason: reason, Task: taskOf(meta, l.ID), EnqueuedAt: time.Now().UTC(), NotBefore: notBefore,
	}
	if err := m.opts.Store.PutRevocation(r); err != nil {
		return err
	}
	if notBefore.After(time.Now()) {
		m.mu.Lock()
		m.graced[meta.VolumeID] = true
		m.mu.Unlock()
	}
	rec := recordFor(meta, l)
	rec.Detail, rec.Task = reason, r.Task
	m.audit(withStage(rec, audit.Revoke), audit.Pending, nil)
	m.kick()
	return nil
}

// expediteGrace makes the queued revocations of a volume that is going
// (its pod is gone) due now: a rotated-out lease waits out its rotation
// grace for readers of the old files, and a gone pod has none. Without
// it, a driver stopped within the grace (an uninstall) kept its state and
// the credential lived on. Only a volume that queued such a revocation
// since the start reads the queue: an unpublish stays cheap (after a
// restart a pending grace simply runs out).
func (m *Manager) expediteGrace(volumeID string) {
	m.mu.Lock()
	graced := m.graced[volumeID]
	delete(m.graced, volumeID)
	m.mu.Unlock()
	if !graced {
		return
	}
	q, err := m.opts.Store.ListRevocations()
	if err != nil {
		klog.ErrorS(err, "Reading the revocation queue", "volumeID", volumeID)
		return
	}
	now := time.Now()
	for _, r := range q {
		if r.VolumeID != volumeID || !r.NotBefore.After(now) {
			continue
		}
		r.NotBefore = time.Time{}
		if err := m.opts.Store.PutRevocation(r); err != nil {
			klog.ErrorS(err, "Making a rotated-out lease's revocation due", "leaseID", r.Lease.ID)
		}
	}
	m.kick()
}

func (m *Manager) kick() {
	select {
	case m.wake <- struct{}{}:
	default:
	}
}

// Run works the revocation queue and sweeps for volumes whose target
// vanished, until ctx is cancelled.
func (m *Manager) Run(ctx context.Context) {
	go m.runRecords(ctx)
	sweep := time.NewTicker(m.opts.SweepInterval)
	defer sweep.Stop()
	next := time.NewTimer(0)
	defer next.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-m.ctx.Done():
			return
		case <-sweep.C:
			m.Sweep(ctx)
			continue
		case <-m.wake:
		case <-next.C:
		}
		rearm(next, m.drain(ctx))
	}
}

// rearm makes t fire after d, whether or not it fired already.
func rearm(t *time.Timer, d time.Duration) {
	t.Stop()
	select {
	case <-t.C:
	default:
	}
	t.Reset(d)
}

// drain attempts every due revocation once and returns how long until the
// next one is due.
func (m *Manager) drain(ctx context.Context) time.Duration {
	queue, err := m.opts.Store.ListRevocations()
	if err != nil {
		klog.ErrorS(err, "Reading the revocation queue")
		return m.opts.RetryMin
	}
	wait := time.Hour
	for _, r := range queue {
		if ctx.Err() != nil {
			return 0
		}
		if at, ok := m.retryAt[r.Lease.ID]; ok && time.Now().Before(at) {
			wait = min(wait, time.Until(at))
			continue
		}
		if time.Now().Before(r.NotBefore) {
			wait = min(wait, time.Until(r.NotBefore))
			continue
		}
		if d, retry := m.revokeOne(ctx, r); retry {
			wait = min(wait, d)
		}
	}
	return wait
}

// revokeOne asks the backend to revoke r. It returns whether r stays
// queued, and then the delay before its next attempt.
func (m *Manager) revokeOne(ctx context.Context, r storage.Revocation) (time.Duration, bool) {
	rec := withExpiry(audit.Record{
		Stage: audit.Revoke, VolumeID: r.VolumeID, Pod: r.Pod, Class: r.Class,
		Provider: r.Lease.Provider, Role: r.Lease.Role, LeaseID: r.Lease.ID, Task: r.Task, Detail: r.Reason,
	}, r.Lease.ExpiresAt)
	if !r.Lease.IssuedAt.IsZero() {
		rec.Lifetime = time.Since(r.Lease.IssuedAt).Round(time.Millisecond).String()
	}
	prov, ok := m.opts.Providers.Get(r.Lease.Provider)
	var err error
	if !ok {
		err = errors.Join(ErrUnknownProvider, errors.New(r.Lease.Provider))
	} else {
		cctx, cancel := context.WithTimeout(ctx, m.opts.BackendTimeout)
		err = prov.Revoke(cctx, r.Lease)
		cancel()
	}
	switch {
	case err == nil, errors.Is(err, provider.ErrNotRevocable):
		outcome := audit.Success
		if err != nil {
			outcome = audit.Unrevocable
			rec.Detail = r.Reason + "; the backend cannot revoke it: it stays valid until expires_at"
		}
		if derr := m.opts.Store.DeleteRevocation(r.Lease.ID); derr != nil {
			klog.ErrorS(derr, "Removing a finished revocation from the queue", "leaseID", r.Lease.ID)
		}
		delete(m.retryAt, r.Lease.ID)
		m.confirm(r.Lease.ID, err)
		m.noteRevoked(r, err != nil)
		m.audit(rec, outcome, nil)
		m.opts.Metrics.LeaseOp(r.Lease.Provider, metrics.OpRevoke, outcome)
		klog.V(2).InfoS("Revoked lease", "leaseID", r.Lease.ID, "volumeID", r.VolumeID, "outcome", outcome)
		return 0, false
	default:
		if ctx.Err() != nil {
			return 0, true
		}
		r.Attempts++
		r.LastError = err.Error()
		if perr := m.opts.Store.PutRevocation(r); perr != nil {
			klog.ErrorS(perr, "Updating the revocation queue", "leaseID", r.Lease.ID)
		}
		d := m.backoff(r.Attempts)
		m.retryAt[r.Lease.ID] = time.Now().Add(d)
		m.audit(withStage(rec, audit.Failure), audit.Error, err)
		m.opts.Metrics.LeaseOp(r.Lease.Provider, metrics.OpRevoke, metrics.Error)
		klog.ErrorS(err, "Revocation failed; will retry", "leaseID", r.Lease.ID, "attempt", r.Attempts, "retryIn", d)
		return d, true
	}
}

// State reports the node's lease state for the metrics gauges.
func (m *Manager) State() metrics.State {
	s := metrics.State{LiveLeases: map[string]int{}}
	now := time.Now()
	m.mu.Lock()
	for _, v := range m.vols {
		if v.meta.State == storage.StateWithdrawn {
			continue
		}
		s.LiveLeases[v.meta.Provider] += 1 + len(v.meta.Tasks)
		if v.failures > 0 {
			s.RenewalFailing++
		}
		if !v.lease.ExpiresAt.IsZero() {
			left := max(v.lease.ExpiresAt.Sub(now), 0)
			if s.SoonestExpiry == 0 || left < s.SoonestExpiry {
				s.SoonestExpiry = left
			}
		}
	}
	m.mu.Unlock()
	if q, err := m.opts.Store.ListRevocations(); err == nil {
		s.RevocationQueue = len(q)
		if len(q) > 0 {
			s.OldestRevocation = now.Sub(q[0].EnqueuedAt)
		}
	}
	return s
}

// QueueLength is the number of revocations not yet confirmed.
func (m *Manager) QueueLength() int {
	q, err := m.opts.Store.ListRevocations()
	if err != nil {
		return -1
	}
	return len(q)
}

// graceEnd is when a lease a rotation just replaced may be revoked:
// RotationGrace from now, never past its own expiry (zero: at once). A
// reader that read the old files just before the swap still logs in.
func (m *Manager) graceEnd(l provider.Lease) time.Time {
	if m.opts.RotationGrace <= 0 {
		return time.Time{}
	}
	end := time.Now().Add(m.opts.RotationGrace).UTC()
	if !l.ExpiresAt.IsZero() && l.ExpiresAt.Before(end) {
		end = l.ExpiresAt.UTC()
	}
	return end
}
