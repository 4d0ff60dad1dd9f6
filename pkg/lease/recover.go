package lease

import (
	"context"
	"errors"
	"fmt"
	"time"

	"k8s.io/klog/v2"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/render"
	"github.com/ephemeral-secrets/csi-driver/pkg/spc"
	"github.com/ephemeral-secrets/csi-driver/pkg/storage"
)

// Recover rebuilds the manager's state from the store after a start: it
// resumes renewal of volumes still mounted, revokes the leases of volumes
// whose target is gone (an unpublish was missed) and of issues a crash
// interrupted, and leaves pending revocations to Run. The driver is Ready
// once it returns.
func (m *Manager) Recover(ctx context.Context) error {
	if n, err := m.opts.Store.RemoveOrphans(); err != nil {
		return fmt.Errorf("removing orphaned volume directories: %w", err)
	} else if n > 0 {
		klog.InfoS("Removed volume directories left without metadata", "count", n)
	}
	ids, err := m.opts.Store.ListVolumes()
	if err != nil {
		return fmt.Errorf("listing volumes: %w", err)
	}
	seen := map[string]time.Time{}
	if err := m.opts.Store.ReadRecord(seenRecord, &seen); err == nil {
		m.mu.Lock()
		m.seen = seen
		m.mu.Unlock()
	}
	resumed, revoked, failed := 0, 0, 0
	for _, id := range ids {
		// One bad volume must not keep the node's other pods from mounting:
		// it is logged and retried by the sweep.
		ok, err := m.recoverVolume(ctx, id)
		switch {
		case err != nil:
			failed++
			klog.ErrorS(err, "Recovering volume; the sweep retries", "volumeID", id)
		case ok:
			resumed++
		default:
			revoked++
		}
	}
	m.mu.Lock()
	m.ready = true
	m.mu.Unlock()
	m.kick()
	klog.InfoS("Recovery finished", "resumed", resumed, "retired", revoked, "failed", failed, "pendingRevocations", m.QueueLength())
	return nil
}

// recoverVolume returns true if the volume is live again.
func (m *Manager) recoverVolume(ctx context.Context, id string) (bool, error) {
	meta, err := m.opts.Store.ReadMetadata(id)
	if err != nil {
		return false, err
	}
	if meta.PendingLeaseID != "" {
		// A crash during Issue (at publish or rotation): whatever it made goes.
		pending := provider.Lease{ID: meta.PendingLeaseID, Provider: meta.Provider, Params: meta.Params}
		if err := m.enqueue(pending, meta, "issue interrupted by a restart"); err != nil {
			return false, err
		}
		meta.PendingLeaseID = ""
		if err := m.opts.Store.WriteMetadata(meta); err != nil {
			return false, err
		}
	}
	l, lerr := m.opts.Store.ReadLease(id)
	if meta.State != storage.StatePublished || lerr != nil || l.ID != meta.LeaseID {
		// The publish never finished, so kubelet got an error and will retry
		// it from scratch: leave nothing behind.
		if meta.State == storage.StatePublished && lerr == nil {
			_ = m.enqueue(l, meta, "inconsistent state after a restart")
		}
		_ = m.opts.Store.UnmountTarget(meta.TargetPath)
		return false, m.opts.Store.DeleteVolume(id)
	}
	if !m.opts.Store.IsMounted(meta.TargetPath) {
		v := &volume{meta: meta, lease: l}
		return false, m.retire(v, "target gone while the driver was down")
	}
	spec, err := m.specFor(ctx, meta)
	if err != nil {
		return false, err
	}
	gid, _ := ParseGID(meta.MountGroup)
	v := &volume{meta: meta, lease: l, spec: spec, gid: gid}
	m.mu.Lock()
	m.vols[id] = v
	m.mu.Unlock()
	m.scheduleRenewal(v)
	klog.V(2).InfoS("Resumed volume", "volumeID", id, "leaseID", l.ID, "expiresAt", l.ExpiresAt)
	return true, nil
}

// specFor finds the file layout of a recovered volume. The class may have
// changed or gone since the publish; the volume then keeps the layout it
// has (its files stay until renewal rewrites them with the class as it is).
func (m *Manager) specFor(ctx context.Context, meta storage.Metadata) (*render.Spec, error) {
	class, err := m.opts.Classes.Resolve(ctx, meta.Pod.Namespace, meta.Attributes[spc.ClassKey])
	if err != nil {
		if errors.Is(err, spc.ErrClassNotFound) {
			klog.InfoS("Class of a live volume is gone; renewals keep the default layout", "volumeID", meta.VolumeID, "class", meta.Class)
			return render.ParseSpec(nil)
		}
		return nil, err
	}
	return render.ParseSpec(class.Parameters)
}

// Sweep does while running what Recover does at start: it retires
// volumes whose target is no longer mounted (the pod went away without an
// unpublish reaching us), and recovers volumes the store has but memory
// does not (a clean-up that failed, a recovery that failed).
func (m *Manager) Sweep(ctx context.Context) {
	stored, err := m.opts.Store.ListVolumes()
	if err != nil {
		klog.ErrorS(err, "Sweep: listing volumes")
	}
	m.mu.Lock()
	ids := make([]string, 0, len(m.vols))
	for id := range m.vols {
		ids = append(ids, id)
	}
	m.mu.Unlock()
	for _, id := range stored {
		if !m.has(id) {
			ids = append(ids, id)
		}
	}
	for _, id := range ids {
		lctx, cancel := context.WithTimeout(ctx, time.Second)
		unlock, err := m.locks.lock(lctx, id)
		cancel()
		if err != nil {
			continue // busy: next sweep
		}
		m.mu.Lock()
		v := m.vols[id]
		m.mu.Unlock()
		if v == nil {
			// Under the lock no publish is half done: stored but not in
			// memory means left behind.
			if _, err := m.recoverVolume(ctx, id); err != nil && !errors.Is(err, storage.ErrVolumeNotFound) {
				klog.ErrorS(err, "Sweep: recovering volume", "volumeID", id)
			}
		} else if !m.opts.Store.IsMounted(v.meta.TargetPath) {
			klog.InfoS("Target vanished without an unpublish; revoking", "volumeID", id, "leaseID", v.lease.ID)
			_ = m.opts.Store.UnmountTarget(v.meta.TargetPath)
			if err := m.retire(v, "target gone"); err != nil {
				klog.ErrorS(err, "Retiring volume", "volumeID", id)
			}
		}
		unlock()
	}
}

func (m *Manager) has(id string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.vols[id] != nil
}
