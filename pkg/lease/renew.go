package lease

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"time"

	"k8s.io/klog/v2"

	"github.com/ephemeral-secrets/csi-driver/pkg/audit"
	"github.com/ephemeral-secrets/csi-driver/pkg/lease/state"
	"github.com/ephemeral-secrets/csi-driver/pkg/lease/volume"
	"github.com/ephemeral-secrets/csi-driver/pkg/metrics"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// scheduleRenewal arms v's timer at its renewal point (volume.Timing).
func (m *Manager) scheduleRenewal(h *volume.Held, v *volume.Volume) {
	if d, ok := m.timing.RenewIn(v, m.clock.Now()); ok {
		m.schedule(h, v, d)
	}
}

// schedule (re)arms v's renewal timer to fire after d; a withdrawn volume
// has none.
func (m *Manager) schedule(h *volume.Held, v *volume.Volume, d time.Duration) {
	if m.ctx.Err() != nil || v.Meta().State == StateWithdrawn {
		return
	}
	id := v.ID()
	v.Arm(h, d, func() { m.renew(id) })
}

// retry counts a failed renewal of v and schedules the next attempt.
func (m *Manager) retry(h *volume.Held, v *volume.Volume, err error, msg string) {
	n := v.Failed(h)
	d := m.timing.RetryIn(v, m.clock.Now())
	klog.ErrorS(err, msg, "volumeID", v.ID(), "provider", v.Meta().Provider, "leaseID", v.Lease().ID, "attempt", n, "retryIn", d)
	m.schedule(h, v, d)
}

// renew runs when a volume's timer fires: extend the lease, or re-issue
// and swap where the provider cannot extend it or the lease has lapsed.
func (m *Manager) renew(id string) {
	h, err := m.vols.Lock(m.ctx, id)
	if err != nil {
		return // shutting down
	}
	defer h.Unlock()
	v := h.Volume()
	if v == nil || v.Meta().State == StateWithdrawn {
		return
	}
	meta, cur := v.Meta(), v.Lease()
	prov, ok := m.opts.Providers.Get(meta.Provider)
	if !ok {
		// Gone from the backend configuration (a reload): keep trying, so
		// that renewal resumes when it is back.
		m.retry(h, v, nil, "Provider of a live lease is not registered; will retry")
		return
	}
	ctx, cancel := context.WithTimeout(m.ctx, m.opts.BackendTimeout)
	defer cancel()

	rec := recordFor(meta, cur)
	lapsed := !cur.ExpiresAt.IsZero() && !m.clock.Now().Before(cur.ExpiresAt)
	if lapsed {
		m.recordLapse(h, v)
	} else {
		asked := m.clock.Now()
		var nl provider.Lease
		nl, err = prov.Renew(ctx, cur)
		if err == nil {
			if !cur.ExpiresAt.IsZero() && m.clock.Now().After(cur.ExpiresAt) {
				m.recordLapse(h, v) // the renewal came late: the pod held a dead credential meanwhile
			}
			nl.ID, nl.Provider, nl.Params = cur.ID, cur.Provider, cur.Params
			if err = m.install(h, v, nl, asked, false); err == nil {
				m.audit(withExpiry(withStage(rec, audit.Renew), nl.ExpiresAt), audit.Success, nil)
				m.opts.Metrics.LeaseOp(meta.Provider, metrics.OpRenew, metrics.Success)
				return
			}
		}
	}
	// A lapsed lease is replaced, not revived: the pod gets a fresh one as
	// soon as the backend answers.
	if lapsed || errors.Is(err, provider.ErrNotRenewable) {
		if err = m.rotate(ctx, h, prov, v, false); err == nil {
			return
		}
	}
	if m.ctx.Err() != nil {
		return
	}
	m.audit(withStage(rec, audit.Renew), audit.Error, err)
	m.opts.Metrics.LeaseOp(meta.Provider, metrics.OpRenew, metrics.Error)
	m.retry(h, v, err, "Renewing lease failed; will retry")
}

// recordLapse writes the one expire record of v's lease having lapsed
// while its pod held it, counts it, and remembers durably that it did.
func (m *Manager) recordLapse(h *volume.Held, v *volume.Volume) {
	meta, l := v.Meta(), v.Lease()
	if meta.LapseRecorded.Equal(l.ExpiresAt) {
		return // recorded already, before a restart perhaps
	}
	meta.LapseRecorded = l.ExpiresAt
	if err := m.opts.Store.WriteMetadata(meta); err != nil {
		klog.ErrorS(err, "Recording a lapse", "volumeID", meta.VolumeID)
	}
	v.SetMeta(h, meta)
	rec := recordFor(meta, l)
	rec.Detail = "the lease expired while its pod held it"
	m.audit(withStage(rec, audit.Expire), audit.Error, nil)
	m.opts.Metrics.LeaseOp(meta.Provider, metrics.OpExpire, metrics.Error)
	klog.ErrorS(nil, "Lease lapsed while its pod held it", "volumeID", meta.VolumeID, "leaseID", l.ID, "expiredAt", l.ExpiresAt)
}

// rotate issues a fresh lease for v (byPod: its pod asked, and wants a
// new credential), swaps the files to it and queues the revocation of
// the old one. Each step is recorded before the next, so
// that recovery can finish or undo a rotation stopped anywhere:
//
//  1. the intent (metadata names the new lease as pending), then Issue;
//  2. the new lease's record (beside the old one's);
//  3. the files, then the metadata naming the new lease: the switch;
//  4. the old lease's revocation queued, then its record removed.
func (m *Manager) rotate(ctx context.Context, h *volume.Held, prov provider.Provider, v *volume.Volume, byPod bool) error {
	meta := v.Meta()
	newID := state.NewLeaseID(meta.Pod)
	meta.PendingLeaseID = newID
	if err := m.opts.Store.WriteMetadata(meta); err != nil {
		return fmt.Errorf("recording the rotation: %w", err)
	}
	v.SetMeta(h, meta)
	asked := m.clock.Now()
	prior := v.Lease()
	nl, err := m.issue(ctx, prov, meta, newID, v.Tokens(), meta.VolumeID, &prior, byPod)
	if err != nil {
		m.abandon(h, v, nl, false)
		return fmt.Errorf("re-issuing: %w", err)
	}
	if err := m.opts.Store.WriteLease(meta.VolumeID, nl); err != nil {
		m.abandon(h, v, nl, false)
		return fmt.Errorf("recording the new lease: %w", err)
	}
	if err := m.switchTo(h, v, nl, asked); err != nil {
		m.abandon(h, v, nl, true)
		return err
	}
	m.audit(withExpiry(withStage(recordFor(v.Meta(), nl), audit.Rotate), nl.ExpiresAt), audit.Success, nil)
	m.opts.Metrics.LeaseOp(meta.Provider, metrics.OpRotate, metrics.Success)
	m.opts.Metrics.Issued(meta.Pod.Namespace, meta.Pod.ServiceAccount, meta.Provider)
	return nil
}

// switchTo makes nl, already recorded, v's lease (steps 3 and 4 of a
// rotation).
func (m *Manager) switchTo(h *volume.Held, v *volume.Volume, nl provider.Lease, granted time.Time) error {
	old := v.Lease()
	if err := m.install(h, v, nl, granted, true); err != nil {
		return err
	}
	m.dropRecord(old, v.Meta(), "rotated", m.timing.GraceEnd(old, m.clock.Now()))
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
func (m *Manager) abandon(h *volume.Held, v *volume.Volume, nl provider.Lease, swapped bool) {
	if swapped {
		if err := m.writeFiles(h, v, v.Lease()); err != nil {
			// The pod may be reading nl: keep it, recorded, rather than revoke
			// what is in use; recovery settles it.
			klog.ErrorS(err, "Restoring files after a failed rotation; keeping the new lease", "volumeID", v.ID())
			return
		}
	}
	if nl.ID != "" && !m.dropRecord(nl, v.Meta(), "rotation failed", time.Time{}) {
		return // the intent still names it
	}
	meta := v.Meta()
	meta.PendingLeaseID = ""
	v.SetMeta(h, meta)
	if err := m.opts.Store.WriteMetadata(meta); err != nil {
		klog.ErrorS(err, "Clearing a rotation's intent", "volumeID", meta.VolumeID)
	}
}

// writeFiles renders l into v's files, swapping them only if they changed.
func (m *Manager) writeFiles(h *volume.Held, v *volume.Volume, l provider.Lease) error {
	files, err := v.Spec().RenderVolume(l, v.Tasks())
	if err != nil {
		return err
	}
	// Unchanged files (a renewal that only moved the expiry, a re-read of
	// a static secret of the same version) are left alone: no swap for
	// readers to notice.
	d := volume.Digest(files)
	if d == v.Digest() {
		return nil
	}
	if err := m.opts.Store.WriteFiles(v.ID(), v.GID(), files); err != nil {
		// It may have failed after its swap: what the files hold is unknown,
		// so the next write (an undone rotation's) is never skipped.
		v.SetDigest(h, [sha256.Size]byte{})
		return err
	}
	v.SetDigest(h, d)
	return nil
}

// install records lease l as v's current one, rewrites the files if they
// changed and schedules the next renewal. A renewed lease (same ID) is
// recorded here; a rotated one was recorded by the caller.
func (m *Manager) install(h *volume.Held, v *volume.Volume, l provider.Lease, granted time.Time, rotated bool) error {
	if !rotated {
		if err := m.opts.Store.WriteLease(v.ID(), l); err != nil {
			return err
		}
	}
	if err := m.writeFiles(h, v, l); err != nil {
		return err
	}
	meta := v.Meta()
	meta.LeaseID, meta.PendingLeaseID, meta.Role, meta.ExpiresAt = l.ID, "", l.Role, l.ExpiresAt
	if rotated {
		meta.IssuedAt, meta.RenewedAt = l.IssuedAt, time.Time{}
		meta.GrantTTL = state.GrantTTL(l, granted)
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
	v.Install(h, meta, l, granted)
	m.scheduleRenewal(h, v)
	m.noteIssued(meta, l)
	return nil
}

// enqueueOrLog queues the revocation of l; the worker runs it at once.
func (m *Manager) enqueueOrLog(l provider.Lease, meta Metadata, reason string) {
	if err := m.enqueue(l, meta, reason); err != nil {
		klog.ErrorS(err, "Queueing a revocation", "leaseID", l.ID)
	}
}
