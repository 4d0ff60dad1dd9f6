package lease

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"time"

	"k8s.io/klog/v2"

	"github.com/ephemeral-secrets/csi-driver/pkg/audit"
	"github.com/ephemeral-secrets/csi-driver/pkg/metrics"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/storage"
)

// scheduleRenewal arms v's timer at RenewFraction of the lease's TTL
// after the lease was granted (issued, or last renewed), less a random
// jitter so that volumes published together do not all renew together.
// The point is on the lease's own timeline: a restart does not move it
// toward expiry.
//
// A lease without expiry (a static secret) is renewed only at the RenewAt
// its provider asks for (a rotation poll), or never.
func (m *Manager) scheduleRenewal(v *volume) {
	if v.lease.ExpiresAt.IsZero() && v.lease.RenewAt.IsZero() {
		return // nothing ever to renew
	}
	d := time.Duration(math.MaxInt64)
	if exp := v.lease.ExpiresAt; !exp.IsZero() {
		f := m.opts.RenewFraction * (1 - m.opts.Jitter*rand.Float64())
		at := renewPoint(v.granted, exp, f, m.clock.Now())
		// A grant a max TTL shortened keeps the margin a full one leaves;
		// a short one keeps up to RotationGrace (at most half the TTL), so
		// that a rotation leaves the old credential that long for readers
		// of the old files (found with a real pod under load: a 2 s margin
		// was less than its read-then-login took).
		margin := time.Duration(float64(v.meta.GrantTTL) * (1 - f))
		if g := min(m.opts.RotationGrace, v.meta.GrantTTL/2); g > margin {
			margin = g
		}
		if exp.Add(-margin).Before(at) {
			at = exp.Add(-margin)
		}
		d = at.Sub(m.clock.Now())
	}
	if !v.lease.RenewAt.IsZero() {
		d = min(d, v.lease.RenewAt.Sub(m.clock.Now()))
	}
	m.schedule(v.meta.VolumeID, max(d, 0))
}

// renewPoint is fraction of the way from granted to expires. Without a
// known grant time (or one not before the expiry) it counts from now.
func renewPoint(granted, expires time.Time, fraction float64, now time.Time) time.Time {
	if granted.IsZero() || !granted.Before(expires) {
		granted = now
	}
	return granted.Add(time.Duration(float64(expires.Sub(granted)) * fraction))
}

// grantTTL is the lifetime l was issued with, granted (at the latest)
// at asked.
func grantTTL(l provider.Lease, asked time.Time) time.Duration {
	if l.ExpiresAt.IsZero() {
		return 0
	}
	from := l.IssuedAt
	if from.IsZero() {
		from = asked
	}
	return max(l.ExpiresAt.Sub(from), 0)
}

// grantedAt is when a recovered lease's current grant began: the latest
// of its issue and its last recorded renewal. A crash between recording a
// renewed lease and its metadata leaves an earlier time, which only
// brings the next renewal forward.
func grantedAt(meta Metadata, l provider.Lease) time.Time {
	t := l.IssuedAt
	for _, u := range []time.Time{meta.IssuedAt, meta.RenewedAt} {
		if u.After(t) && l.ID == meta.LeaseID {
			t = u
		}
	}
	return t
}

// schedule (re)arms the renewal timer of a volume to fire after d.
func (m *Manager) schedule(id string, d time.Duration) {
	m.mu.Lock()
	defer m.mu.Unlock()
	v := m.vols[id]
	if v == nil || m.ctx.Err() != nil || v.meta.State == StateWithdrawn {
		return
	}
	if v.timer != nil {
		v.timer.Stop()
	}
	v.renewAt = m.clock.Now().Add(d)
	v.timer = m.after(d, func() { m.renew(id) })
}

// backoff is the delay before retry number n (1-based), capped.
func (m *Manager) backoff(n int) time.Duration {
	d := m.opts.RetryMin
	for i := 1; i < n && d < m.opts.RetryMax; i++ {
		d *= 2
	}
	return min(d, m.opts.RetryMax)
}

// retryDelay is the delay before the next renewal attempt of v after a
// failure: the backoff, but at most a quarter of the time the lease has
// left, and RetryMin (as often as every second by default) in its last
// minute and once it has lapsed.
func (m *Manager) retryDelay(v *volume) time.Duration {
	d := m.backoff(v.failures)
	if !v.lease.ExpiresAt.IsZero() {
		left := v.lease.ExpiresAt.Sub(m.clock.Now())
		if left < time.Minute {
			return m.opts.RetryMin
		}
		d = min(d, left/4)
	}
	return max(d, m.opts.RetryMin)
}

// renew runs when a volume's timer fires: extend the lease, or re-issue
// and swap where the provider cannot extend it or the lease has lapsed.
func (m *Manager) renew(id string) {
	unlock, err := m.locks.Lock(m.ctx, id)
	if err != nil {
		return // shutting down
	}
	defer unlock()
	m.mu.Lock()
	v := m.vols[id]
	m.mu.Unlock()
	if v == nil || v.meta.State == StateWithdrawn {
		return
	}
	prov, ok := m.opts.Providers.Get(v.meta.Provider)
	if !ok {
		// Gone from the backend configuration (a reload): keep trying, so
		// that renewal resumes when it is back.
		m.mu.Lock()
		v.failures++
		m.mu.Unlock()
		d := m.retryDelay(v)
		klog.ErrorS(nil, "Provider of a live lease is not registered; will retry", "volumeID", id, "provider", v.meta.Provider, "retryIn", d)
		m.schedule(id, d)
		return
	}
	ctx, cancel := context.WithTimeout(m.ctx, m.opts.BackendTimeout)
	defer cancel()

	rec := recordFor(v.meta, v.lease)
	lapsed := !v.lease.ExpiresAt.IsZero() && !m.clock.Now().Before(v.lease.ExpiresAt)
	if lapsed {
		m.recordLapse(v)
	} else {
		asked := m.clock.Now()
		var nl provider.Lease
		nl, err = prov.Renew(ctx, v.lease)
		if err == nil {
			if !v.lease.ExpiresAt.IsZero() && m.clock.Now().After(v.lease.ExpiresAt) {
				m.recordLapse(v) // the renewal came late: the pod held a dead credential meanwhile
			}
			nl.ID, nl.Provider, nl.Params = v.lease.ID, v.lease.Provider, v.lease.Params
			if err = m.install(v, nl, asked, false); err == nil {
				m.audit(withExpiry(withStage(rec, audit.Renew), nl.ExpiresAt), audit.Success, nil)
				m.opts.Metrics.LeaseOp(v.meta.Provider, metrics.OpRenew, metrics.Success)
				return
			}
		}
	}
	// A lapsed lease is replaced, not revived: the pod gets a fresh one as
	// soon as the backend answers.
	if lapsed || errors.Is(err, provider.ErrNotRenewable) {
		if err = m.rotate(ctx, prov, v); err == nil {
			return
		}
	}
	if m.ctx.Err() != nil {
		return
	}
	m.mu.Lock()
	v.failures++
	m.mu.Unlock()
	m.audit(withStage(rec, audit.Renew), audit.Error, err)
	m.opts.Metrics.LeaseOp(v.meta.Provider, metrics.OpRenew, metrics.Error)
	d := m.retryDelay(v)
	klog.ErrorS(err, "Renewing lease failed; will retry", "volumeID", id, "leaseID", v.lease.ID, "attempt", v.failures, "retryIn", d)
	m.schedule(id, d)
}

// recordLapse writes the one expire record of v's lease having lapsed
// while its pod held it, counts it, and remembers durably that it did.
func (m *Manager) recordLapse(v *volume) {
	if v.meta.LapseRecorded.Equal(v.lease.ExpiresAt) {
		return // recorded already, before a restart perhaps
	}
	meta := v.meta
	meta.LapseRecorded = v.lease.ExpiresAt
	if err := m.opts.Store.WriteMetadata(meta); err != nil {
		klog.ErrorS(err, "Recording a lapse", "volumeID", meta.VolumeID)
	}
	m.mu.Lock()
	v.meta = meta
	m.mu.Unlock()
	rec := recordFor(meta, v.lease)
	rec.Detail = "the lease expired while its pod held it"
	m.audit(withStage(rec, audit.Expire), audit.Error, nil)
	m.opts.Metrics.LeaseOp(meta.Provider, metrics.OpExpire, metrics.Error)
	klog.ErrorS(nil, "Lease lapsed while its pod held it", "volumeID", meta.VolumeID, "leaseID", v.lease.ID, "expiredAt", v.lease.ExpiresAt)
}

// rotate issues a fresh lease for v, swaps the files to it and queues the
// revocation of the old one. Each step is recorded before the next, so
// that recovery can finish or undo a rotation stopped anywhere:
//
//  1. the intent (metadata names the new lease as pending), then Issue;
//  2. the new lease's record (beside the old one's);
//  3. the files, then the metadata naming the new lease: the switch;
//  4. the old lease's revocation queued, then its record removed.
func (m *Manager) rotate(ctx context.Context, prov provider.Provider, v *volume) error {
	newID := newLeaseID(v.meta.Pod)
	meta := v.meta
	meta.PendingLeaseID = newID
	if err := m.opts.Store.WriteMetadata(meta); err != nil {
		return fmt.Errorf("recording the rotation: %w", err)
	}
	m.mu.Lock()
	v.meta = meta
	tokens := v.tokens
	m.mu.Unlock()
	asked := m.clock.Now()
	nl, err := prov.Issue(ctx, provider.Request{
		LeaseID: newID, VolumeID: v.meta.VolumeID, Class: v.meta.Class, Params: v.meta.Params, Pod: v.meta.Pod, Tokens: tokens,
	})
	nl.ID, nl.Provider, nl.Params = newID, v.meta.Provider, v.meta.Params
	if err != nil {
		if !mayHaveIssued(err) {
			nl = provider.Lease{}
		}
		m.abandon(v, nl, false)
		return fmt.Errorf("re-issuing: %w", err)
	}
	if err := m.opts.Store.WriteLease(v.meta.VolumeID, nl); err != nil {
		m.abandon(v, nl, false)
		return fmt.Errorf("recording the new lease: %w", err)
	}
	if err := m.switchTo(v, nl, asked); err != nil {
		m.abandon(v, nl, true)
		return err
	}
	m.audit(withExpiry(withStage(recordFor(v.meta, nl), audit.Rotate), nl.ExpiresAt), audit.Success, nil)
	m.opts.Metrics.LeaseOp(v.meta.Provider, metrics.OpRotate, metrics.Success)
	return nil
}

// switchTo makes nl, already recorded, v's lease (steps 3 and 4 of a
// rotation).
func (m *Manager) switchTo(v *volume, nl provider.Lease, granted time.Time) error {
	old := v.lease
	if err := m.install(v, nl, granted, true); err != nil {
		return err
	}
	m.dropRecord(old, v.meta, "rotated", m.graceEnd(old))
	return nil
}

// dropRecord queues the revocation of l, a lease of the volume meta
// describes that it no longer uses, not to run before notBefore (zero: at
// once), then removes l's record. A record whose revocation could not be
// queued stays, for recovery to queue; it reports whether the revocation
// was queued.
func (m *Manager) dropRecord(l provider.Lease, meta Metadata, reason string, notBefore time.Time) bool {
	if err := m.enqueueAfter(l, meta, reason, notBefore); err != nil {
		klog.ErrorS(err, "Queueing a revocation", "leaseID", l.ID)
		return false
	}
	if err := m.opts.Store.DeleteLease(meta.VolumeID, l.ID); err != nil {
		klog.ErrorS(err, "Removing the record of a queued lease", "leaseID", l.ID)
	}
	return true
}

// abandon undoes a rotation that did not switch: v's own files back
// first where the rotation may have swapped them, then the revocation of
// nl (when it may exist) queued, then the intent cleared. In that order a
// crash leaves nl named by the intent or queued: recovery never puts a
// queued lease in use, and revokes one that is only named.
func (m *Manager) abandon(v *volume, nl provider.Lease, swapped bool) {
	if swapped {
		if err := m.writeFiles(v, v.lease); err != nil {
			// The pod may be reading nl: keep it, recorded, rather than revoke
			// what is in use; recovery settles it.
			klog.ErrorS(err, "Restoring files after a failed rotation; keeping the new lease", "volumeID", v.meta.VolumeID)
			return
		}
	}
	if nl.ID != "" && !m.dropRecord(nl, v.meta, "rotation failed", time.Time{}) {
		return // the intent still names it
	}
	m.mu.Lock()
	v.meta.PendingLeaseID = ""
	meta := v.meta
	m.mu.Unlock()
	if err := m.opts.Store.WriteMetadata(meta); err != nil {
		klog.ErrorS(err, "Clearing a rotation's intent", "volumeID", meta.VolumeID)
	}
}

// writeFiles renders l into v's files, swapping them only if they changed.
func (m *Manager) writeFiles(v *volume, l provider.Lease) error {
	files, err := v.spec.RenderVolume(l, v.tasks)
	if err != nil {
		return err
	}
	// Unchanged files (a renewal that only moved the expiry, a re-read of
	// a static secret of the same version) are left alone: no swap for
	// readers to notice.
	d := digest(files)
	if d == v.digest {
		return nil
	}
	if err := m.opts.Store.WriteFiles(v.meta.VolumeID, v.gid, files); err != nil {
		// It may have failed after its swap: what the files hold is unknown,
		// so the next write (an undone rotation's) is never skipped.
		m.mu.Lock()
		v.digest = [sha256.Size]byte{}
		m.mu.Unlock()
		return err
	}
	m.mu.Lock()
	v.digest = d
	m.mu.Unlock()
	return nil
}

// install records lease l as v's current one, rewrites the files if they
// changed and schedules the next renewal. A renewed lease (same ID) is
// recorded here; a rotated one was recorded by the caller.
func (m *Manager) install(v *volume, l provider.Lease, granted time.Time, rotated bool) error {
	if !rotated {
		if err := m.opts.Store.WriteLease(v.meta.VolumeID, l); err != nil {
			return err
		}
	}
	if err := m.writeFiles(v, l); err != nil {
		return err
	}
	meta := v.meta
	meta.LeaseID, meta.PendingLeaseID, meta.Role, meta.ExpiresAt = l.ID, "", l.Role, l.ExpiresAt
	if rotated {
		meta.IssuedAt, meta.RenewedAt = l.IssuedAt, time.Time{}
		meta.GrantTTL = grantTTL(l, granted)
		meta.Renewals = 0
	} else {
		meta.RenewedAt = granted.UTC()
		meta.Renewals++
	}
	if err := m.opts.Store.WriteMetadata(meta); err != nil {
		return err
	}
	if !l.IssuedAt.IsZero() && (rotated || granted.IsZero()) {
		granted = l.IssuedAt
	}
	m.mu.Lock()
	v.meta, v.lease, v.failures, v.granted = meta, l, 0, granted
	m.mu.Unlock()
	m.scheduleRenewal(v)
	m.noteIssued(meta, l)
	return nil
}

// digest identifies a set of files: names, modes and contents.
func digest(files []storage.File) [sha256.Size]byte {
	h := sha256.New()
	for _, f := range files {
		fmt.Fprintf(h, "%s\x00%o\x00%d\x00", f.Path, f.Mode, len(f.Data))
		h.Write(f.Data)
	}
	var d [sha256.Size]byte
	h.Sum(d[:0])
	return d
}

// enqueueOrLog queues the revocation of l; the worker runs it at once.
func (m *Manager) enqueueOrLog(l provider.Lease, meta Metadata, reason string) {
	if err := m.enqueue(l, meta, reason); err != nil {
		klog.ErrorS(err, "Queueing a revocation", "leaseID", l.ID)
	}
}
