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

// scheduleRenewal arms v's timer at RenewFraction of the lease's remaining
// life, less a random jitter so that volumes published together do not
// all renew together.
//
// A lease without expiry (a static secret) is renewed only at the RenewAt
// its provider asks for (a rotation poll), or never.
func (m *Manager) scheduleRenewal(v *volume) {
	if v.lease.ExpiresAt.IsZero() && v.lease.RenewAt.IsZero() {
		return // nothing ever to renew
	}
	d := time.Duration(math.MaxInt64)
	if !v.lease.ExpiresAt.IsZero() {
		left := time.Until(v.lease.ExpiresAt)
		d = time.Duration(float64(left) * m.opts.RenewFraction * (1 - m.opts.Jitter*rand.Float64()))
	}
	if !v.lease.RenewAt.IsZero() {
		d = min(d, time.Until(v.lease.RenewAt))
	}
	m.schedule(v.meta.VolumeID, max(d, 0))
}

// schedule (re)arms the renewal timer of a volume to fire after d.
func (m *Manager) schedule(id string, d time.Duration) {
	m.mu.Lock()
	defer m.mu.Unlock()
	v := m.vols[id]
	if v == nil || m.ctx.Err() != nil {
		return
	}
	if v.timer != nil {
		v.timer.Stop()
	}
	v.renewAt = time.Now().Add(d)
	v.timer = time.AfterFunc(d, func() { m.renew(id) })
}

// backoff is the delay before retry number n (1-based), capped.
func (m *Manager) backoff(n int) time.Duration {
	d := m.opts.RetryMin
	for i := 1; i < n && d < m.opts.RetryMax; i++ {
		d *= 2
	}
	return min(d, m.opts.RetryMax)
}

// renew runs when a volume's timer fires: extend the lease, or re-issue
// and swap where the provider cannot extend it.
func (m *Manager) renew(id string) {
	unlock, err := m.locks.lock(m.ctx, id)
	if err != nil {
		return // shutting down
	}
	defer unlock()
	m.mu.Lock()
	v := m.vols[id]
	m.mu.Unlock()
	if v == nil {
		return
	}
	prov, ok := m.opts.Providers.Get(v.meta.Provider)
	if !ok {
		klog.ErrorS(nil, "Provider of a live lease is not registered; cannot renew", "volumeID", id, "provider", v.meta.Provider)
		return
	}
	ctx, cancel := context.WithTimeout(m.ctx, m.opts.BackendTimeout)
	defer cancel()

	rec := recordFor(v.meta, v.lease)
	nl, err := prov.Renew(ctx, v.lease)
	switch {
	case err == nil:
		nl.ID, nl.Provider, nl.Params = v.lease.ID, v.lease.Provider, v.lease.Params
		if err = m.install(v, nl, false); err == nil {
			m.audit(withExpiry(withStage(rec, audit.Renew), nl.ExpiresAt), audit.Success, nil)
			m.opts.Metrics.LeaseOp(v.meta.Provider, metrics.OpRenew, metrics.Success)
			return
		}
	case errors.Is(err, provider.ErrNotRenewable) || time.Now().After(v.lease.ExpiresAt):
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
	stage, op := audit.Renew, metrics.OpRenew
	if !v.lease.ExpiresAt.IsZero() && time.Now().After(v.lease.ExpiresAt) {
		// The pod now holds a dead credential; keep trying to replace it.
		stage, op = audit.Expire, metrics.OpExpire
	}
	m.audit(withStage(rec, stage), audit.Error, err)
	m.opts.Metrics.LeaseOp(v.meta.Provider, op, metrics.Error)
	klog.ErrorS(err, "Renewing lease failed; will retry", "volumeID", id, "leaseID", v.lease.ID, "attempt", v.failures)
	m.schedule(id, m.backoff(v.failures))
}

// rotate issues a fresh lease for v, swaps the files to it and queues the
// revocation of the old one.
func (m *Manager) rotate(ctx context.Context, prov provider.Provider, v *volume) error {
	old := v.lease
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
	nl, err := prov.Issue(ctx, provider.Request{
		LeaseID: newID, Class: v.meta.Class, Params: v.meta.Params, Pod: v.meta.Pod, Tokens: tokens,
	})
	nl.ID, nl.Provider, nl.Params = newID, v.meta.Provider, v.meta.Params
	if err != nil {
		if mayHaveIssued(err) {
			m.enqueueOrLog(nl, v.meta, "rotation failed")
		}
		m.mu.Lock()
		v.meta.PendingLeaseID = ""
		m.mu.Unlock()
		_ = m.opts.Store.WriteMetadata(v.meta)
		return fmt.Errorf("re-issuing: %w", err)
	}
	if err := m.install(v, nl, true); err != nil {
		m.enqueueOrLog(nl, v.meta, "rotation failed")
		return err
	}
	if err := m.enqueue(old, v.meta, "rotated"); err != nil {
		klog.ErrorS(err, "Queueing revocation of the rotated-out lease", "leaseID", old.ID)
	}
	m.audit(withExpiry(withStage(recordFor(v.meta, nl), audit.Rotate), nl.ExpiresAt), audit.Success, nil)
	m.opts.Metrics.LeaseOp(v.meta.Provider, metrics.OpRotate, metrics.Success)
	return nil
}

// install records lease l as v's current one, rewrites the files if they
// changed and schedules the next renewal.
func (m *Manager) install(v *volume, l provider.Lease, rotated bool) error {
	files, err := v.spec.Render(l)
	if err != nil {
		return err
	}
	if err := m.opts.Store.WriteLease(v.meta.VolumeID, l); err != nil {
		return err
	}
	// Unchanged files (a renewal that only moved the expiry, a re-read of
	// a static secret of the same version) are left alone: no swap for
	// readers to notice.
	if d := digest(files); d != v.digest {
		if err := m.opts.Store.WriteFiles(v.meta.VolumeID, v.gid, files); err != nil {
			return err
		}
		v.digest = d
	}
	meta := v.meta
	meta.LeaseID, meta.PendingLeaseID, meta.Role, meta.ExpiresAt = l.ID, "", l.Role, l.ExpiresAt
	if rotated {
		meta.IssuedAt = l.IssuedAt
	} else {
		meta.RenewedAt = time.Now().UTC()
	}
	if err := m.opts.Store.WriteMetadata(meta); err != nil {
		return err
	}
	m.mu.Lock()
	v.meta, v.lease, v.failures = meta, l, 0
	m.mu.Unlock()
	m.scheduleRenewal(v)
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
func (m *Manager) enqueueOrLog(l provider.Lease, meta storage.Metadata, reason string) {
	if err := m.enqueue(l, meta, reason); err != nil {
		klog.ErrorS(err, "Queueing a revocation", "leaseID", l.ID)
	}
}
