package lease

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
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
	if err := m.revocations.Load(); err != nil {
		return err
	}
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
		ok, err := m.recoverLocked(ctx, id)
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
	klog.InfoS("Recovery finished", "resumed", resumed, "retired", revoked, "failed", failed, "pendingRevocations", m.QueueLength())
	return nil
}

// recoverLocked is recoverVolume under the volume's lock.
func (m *Manager) recoverLocked(ctx context.Context, id string) (bool, error) {
	unlock, err := m.locks.Lock(ctx, id)
	if err != nil {
		return false, err
	}
	defer unlock()
	return m.recoverVolume(ctx, id)
}

// recoverVolume returns true if the volume is live again. It never
// deletes a lease record without queueing that lease's revocation with
// everything the record holds (a Vault token included). The caller holds
// the volume's lock: the renewal it arms may be due at once, and must not
// change the volume while its recovery still reads it.
func (m *Manager) recoverVolume(ctx context.Context, id string) (bool, error) {
	meta, err := m.opts.Store.ReadMetadata(id)
	if err != nil {
		return false, err
	}
	records, err := m.opts.Store.ListLeases(id)
	if err != nil {
		return false, err
	}
	byID := map[string]provider.Lease{}
	for _, l := range records {
		byID[l.ID] = l
	}
	cur, published := byID[meta.LeaseID]
	if meta.State == StateWithdrawn {
		return m.recoverWithdrawn(meta, cur)
	}
	if meta.State != StatePublished || !published {
		// The publish never finished, so kubelet got an error and will
		// retry it from scratch: leave nothing behind.
		if err := m.enqueueHeld(meta, provider.Lease{}, "issue interrupted by a restart"); err != nil {
			return false, err
		}
		if err := m.opts.Store.UnmountTarget(meta.TargetPath); err != nil {
			return false, err
		}
		return false, m.opts.Store.DeleteVolume(id)
	}
	if !m.opts.Store.IsMounted(meta.TargetPath) {
		v := &volume{meta: meta, lease: cur}
		return false, m.retire(v, "target gone while the driver was down")
	}
	spec, err := m.specFor(ctx, meta)
	if err != nil {
		return false, err
	}
	gid, _ := ParseGID(meta.MountGroup)
	v := &volume{meta: meta, lease: cur, spec: spec, gid: gid, granted: grantedAt(meta, cur), tasks: map[string]provider.Lease{}}
	if err := m.finishRotation(v, byID); err != nil {
		return false, err
	}
	if err := m.recoverTasks(v, byID); err != nil {
		return false, err
	}
	// Records of leases the volume no longer uses (a rotation stopped
	// after its switch) go to the revocation queue.
	if records, err = m.opts.Store.ListLeases(id); err != nil {
		return false, err
	}
	for _, l := range records {
		if l.ID != v.lease.ID && taskOf(v.meta, l.ID) == "" {
			m.dropRecord(l, v.meta, "rotated (finished after a restart)", m.graceEnd(l))
		}
	}
	if v.meta.LeaseAPI {
		// A task a restart ended (its record said so before its files went)
		// leaves files behind: the files again, of the leases held.
		if err := m.writeFiles(v, v.lease); err != nil {
			return false, fmt.Errorf("rewriting the files of the tasks held: %w", err)
		}
	}
	m.mu.Lock()
	m.vols[id] = v
	m.mu.Unlock()
	m.scheduleRenewal(v)
	// Recorded again: a record written before the restart is updated, one
	// a crash kept from being written is created.
	m.noteIssued(v.meta, v.lease)
	for task, t := range v.meta.Tasks {
		m.armTask(v, task, t.ExpiresAt) // one past its end ends at once
		if l, ok := v.tasks[task]; ok {
			l.ExpiresAt = t.ExpiresAt
			m.noteIssued(v.meta, l)
		}
	}
	m.openSocket(v)
	klog.V(2).InfoS("Resumed volume", "volumeID", id, "leaseID", v.lease.ID, "expiresAt", v.lease.ExpiresAt)
	return true, nil
}

// finishRotation settles a rotation a restart stopped, on a volume whose
// pod still runs. With the new lease recorded (and not already queued for
// revocation), it goes forward: the new lease's files, then the switch.
// Otherwise it goes back: the volume's own files, and the revocation of
// whatever Issue may have made.
func (m *Manager) finishRotation(v *volume, records map[string]provider.Lease) error {
	pending := v.meta.PendingLeaseID
	if pending == "" {
		return nil
	}
	nl, recorded := records[pending]
	if recorded && !m.queued(pending) {
		err := m.switchTo(v, nl, time.Time{})
		if err == nil {
			klog.InfoS("Finished a rotation a restart interrupted", "volumeID", v.meta.VolumeID, "leaseID", nl.ID)
			return nil
		}
		klog.ErrorS(err, "Finishing a rotation a restart interrupted; undoing it", "volumeID", v.meta.VolumeID)
	}
	if !recorded {
		nl = provider.Lease{ID: pending, Provider: v.meta.Provider, Params: v.meta.Params}
	}
	m.abandon(v, nl, true)
	if v.meta.PendingLeaseID != "" {
		return fmt.Errorf("undoing an interrupted rotation of volume %s failed", v.meta.VolumeID)
	}
	return nil
}

// queued reports whether the revocation of lease id is queued.
func (m *Manager) queued(id string) bool { return m.revocations.Queued(id) }

// enqueueHeld queues the revocation of every lease the volume holds (see
// heldLeases), with all each record holds.
func (m *Manager) enqueueHeld(meta Metadata, cur provider.Lease, reason string) error {
	leases, err := m.heldLeases(meta, cur)
	if err != nil {
		return err
	}
	for _, l := range leases {
		if err := m.enqueue(l, meta, reason); err != nil {
			return err
		}
	}
	return nil
}

// recoverWithdrawn finishes the withdrawal of a volume a restart found:
// retired if its target is gone, else kept, empty, with every lease it
// still holds queued for revocation. It reports false: nothing is live.
func (m *Manager) recoverWithdrawn(meta Metadata, cur provider.Lease) (bool, error) {
	gid, _ := ParseGID(meta.MountGroup)
	v := &volume{meta: meta, lease: cur, gid: gid, tasks: map[string]provider.Lease{}}
	if !m.opts.Store.IsMounted(meta.TargetPath) {
		return false, m.retire(v, "target gone while the driver was down")
	}
	reason := meta.WithdrawReason
	if reason == "" {
		reason = "withdrawn"
	}
	if _, err := m.settleWithdrawn(v, reason+" (finished after a restart)"); err != nil {
		return false, err
	}
	m.mu.Lock()
	m.vols[meta.VolumeID] = v
	m.mu.Unlock()
	m.openSocket(v)
	return false, nil
}

// specFor finds the file layout of a recovered volume. The class may have
// changed or gone since the publish; the volume then keeps the layout it
// has (its files stay until renewal rewrites them with the class as it is).
func (m *Manager) specFor(ctx context.Context, meta Metadata) (*render.Spec, error) {
	class, err := m.opts.Classes.Resolve(ctx, meta.Pod.Namespace, meta.Attributes[spc.ClassKey])
	if err != nil {
		if errors.Is(err, spc.ErrClassNotFound) {
			klog.InfoS("Class of a live volume is gone; renewals keep the default layout", "volumeID", meta.VolumeID, "class", meta.Class)
			return render.ParseSpecWithin(nil, m.opts.Render)
		}
		return nil, err
	}
	return render.ParseSpecWithin(class.Parameters, m.opts.Render)
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
		unlock, err := m.locks.Lock(lctx, id)
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

// recoverTasks keeps the task leases of a recovered volume whose issue
// finished, and ends those a restart interrupted.
func (m *Manager) recoverTasks(v *volume, records map[string]provider.Lease) error {
	for _, task := range slices.Sorted(maps.Keys(v.meta.Tasks)) {
		t := v.meta.Tasks[task]
		if l, ok := records[t.LeaseID]; ok {
			v.tasks[task] = l
			if t.State == StatePublished {
				continue
			}
		}
		if err := m.endTask(v, task, "task issue interrupted by a restart"); err != nil {
			return err
		}
	}
	return nil
}

// openSocket listens on v's lease socket again after a restart.
func (m *Manager) openSocket(v *volume) {
	if !v.meta.LeaseAPI || m.opts.Sockets == nil {
		return
	}
	if err := m.opts.Sockets.Open(v.meta.VolumeID, v.gid); err != nil {
		klog.ErrorS(err, "Opening a recovered volume's lease socket", "volumeID", v.meta.VolumeID)
	}
}
