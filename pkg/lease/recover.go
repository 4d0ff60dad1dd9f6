package lease

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"

	"k8s.io/klog/v2"

	"github.com/ephemeral-secrets/csi-driver/pkg/lease/volume"
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
	m.seen.Load(m.opts.Store)
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
	m.ready.Store(true)
	klog.InfoS("Recovery finished", "resumed", resumed, "retired", revoked, "failed", failed, "pendingRevocations", m.QueueLength())
	return nil
}

// recoverLocked is recoverVolume under the volume's lock.
func (m *Manager) recoverLocked(ctx context.Context, id string) (bool, error) {
	h, err := m.vols.Lock(ctx, id)
	if err != nil {
		return false, err
	}
	defer h.Unlock()
	return m.recoverVolume(ctx, h)
}

// recoverVolume returns true if the volume is live again. It never
// deletes a lease record without queueing that lease's revocation with
// everything the record holds (a Vault token included). The caller holds
// the volume's lock: the renewal it arms may be due at once, and must not
// change the volume while its recovery still reads it.
func (m *Manager) recoverVolume(ctx context.Context, h *volume.Held) (bool, error) {
	id := h.ID()
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
		return m.recoverWithdrawn(h, meta, cur)
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
		return false, m.retire(h, volume.New(m.clock, volume.Initial{Meta: meta, Lease: cur}), "target gone while the driver was down")
	}
	spec, err := m.specFor(ctx, meta)
	if err != nil {
		return false, err
	}
	gid, _ := ParseGID(meta.MountGroup)
	v := volume.New(m.clock, volume.Initial{Meta: meta, Lease: cur, Spec: spec, GID: gid, Granted: meta.GrantedAt(cur)})
	if err := m.finishRotation(h, v, byID); err != nil {
		return false, err
	}
	if err := m.recoverTasks(h, v, byID); err != nil {
		return false, err
	}
	// Records of leases the volume no longer uses (a rotation stopped
	// after its switch) go to the revocation queue.
	if records, err = m.opts.Store.ListLeases(id); err != nil {
		return false, err
	}
	meta, cur = v.Meta(), v.Lease()
	for _, l := range records {
		if l.ID != cur.ID && meta.TaskOf(l.ID) == "" {
			m.dropRecord(l, meta, "rotated (finished after a restart)", m.timing.GraceEnd(l, m.clock.Now()))
		}
	}
	if meta.LeaseAPI {
		// A task a restart ended (its record said so before its files went)
		// leaves files behind: the files again, of the leases held.
		if err := m.writeFiles(h, v, cur); err != nil {
			return false, fmt.Errorf("rewriting the files of the tasks held: %w", err)
		}
	}
	h.Put(v)
	m.scheduleRenewal(h, v)
	// Recorded again: a record written before the restart is updated, one
	// a crash kept from being written is created.
	m.noteIssued(meta, cur)
	tasks := v.Tasks()
	for task, t := range meta.Tasks {
		m.armTask(h, v, task, t.ExpiresAt) // one past its end ends at once
		if l, ok := tasks[task]; ok {
			l.ExpiresAt = t.ExpiresAt
			m.noteIssued(meta, l)
		}
	}
	m.openSocket(v)
	klog.V(2).InfoS("Resumed volume", "volumeID", id, "leaseID", cur.ID, "expiresAt", cur.ExpiresAt)
	return true, nil
}

// finishRotation settles a rotation a restart stopped, on a volume whose
// pod still runs. With the new lease recorded (and not already queued for
// revocation), it goes forward: the new lease's files, then the switch.
// Otherwise it goes back: the volume's own files, and the revocation of
// whatever Issue may have made.
func (m *Manager) finishRotation(h *volume.Held, v *volume.Volume, records map[string]provider.Lease) error {
	pending := v.Meta().PendingLeaseID
	if pending == "" {
		return nil
	}
	nl, recorded := records[pending]
	if recorded && !m.revocations.Queued(pending) {
		err := m.switchTo(h, v, nl, time.Time{})
		if err == nil {
			klog.InfoS("Finished a rotation a restart interrupted", "volumeID", v.ID(), "leaseID", nl.ID)
			return nil
		}
		klog.ErrorS(err, "Finishing a rotation a restart interrupted; undoing it", "volumeID", v.ID())
	}
	if !recorded {
		nl = v.Meta().Named(pending)
	}
	m.abandon(h, v, nl, true)
	if v.Meta().PendingLeaseID != "" {
		return fmt.Errorf("undoing an interrupted rotation of volume %s failed", v.ID())
	}
	return nil
}

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
func (m *Manager) recoverWithdrawn(h *volume.Held, meta Metadata, cur provider.Lease) (bool, error) {
	gid, _ := ParseGID(meta.MountGroup)
	v := volume.New(m.clock, volume.Initial{Meta: meta, Lease: cur, GID: gid})
	if !m.opts.Store.IsMounted(meta.TargetPath) {
		return false, m.retire(h, v, "target gone while the driver was down")
	}
	reason := meta.WithdrawReason
	if reason == "" {
		reason = "withdrawn"
	}
	if _, err := m.settleWithdrawn(h, v, reason+" (finished after a restart)"); err != nil {
		return false, err
	}
	h.Put(v)
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
	var ids []string
	for _, v := range m.vols.All() {
		ids = append(ids, v.ID())
	}
	for _, id := range stored {
		if !m.Published(id) {
			ids = append(ids, id)
		}
	}
	for _, id := range ids {
		lctx, cancel := context.WithTimeout(ctx, time.Second)
		h, err := m.vols.Lock(lctx, id)
		cancel()
		if err != nil {
			continue // busy: next sweep
		}
		if v := h.Volume(); v == nil {
			// Under the lock no publish is half done: stored but not in
			// memory means left behind.
			if _, err := m.recoverVolume(ctx, h); err != nil && !errors.Is(err, storage.ErrVolumeNotFound) {
				klog.ErrorS(err, "Sweep: recovering volume", "volumeID", id)
			}
		} else if target := v.Meta().TargetPath; !m.opts.Store.IsMounted(target) {
			klog.InfoS("Target vanished without an unpublish; revoking", "volumeID", id, "leaseID", v.Lease().ID)
			_ = m.opts.Store.UnmountTarget(target)
			if err := m.retire(h, v, "target gone"); err != nil {
				klog.ErrorS(err, "Retiring volume", "volumeID", id)
			}
		}
		h.Unlock()
	}
}

// recoverTasks keeps the task leases of a recovered volume whose issue
// finished, and ends those a restart interrupted.
func (m *Manager) recoverTasks(h *volume.Held, v *volume.Volume, records map[string]provider.Lease) error {
	tasks := v.Meta().Tasks
	for _, task := range slices.Sorted(maps.Keys(tasks)) {
		t := tasks[task]
		if l, ok := records[t.LeaseID]; ok {
			v.SetTask(h, task, l)
			if t.State == StatePublished {
				continue
			}
		}
		if err := m.endTask(h, v, task, "task issue interrupted by a restart"); err != nil {
			return err
		}
	}
	return nil
}

// openSocket listens on v's lease socket again after a restart.
func (m *Manager) openSocket(v *volume.Volume) {
	if !v.Meta().LeaseAPI || m.opts.Sockets == nil {
		return
	}
	if err := m.opts.Sockets.Open(v.ID(), v.GID()); err != nil {
		klog.ErrorS(err, "Opening a recovered volume's lease socket", "volumeID", v.ID())
	}
}
