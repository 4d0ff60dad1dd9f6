package lease

import (
	"context"
	"errors"
	"fmt"

	"k8s.io/klog/v2"

	"github.com/ephemeral-secrets/csi-driver/pkg/lease/revocation"
	"github.com/ephemeral-secrets/csi-driver/pkg/lease/volume"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

var (
	// ErrUnknownVolume: no volume of that ID is published on the node.
	ErrUnknownVolume = errors.New("no such volume on this node")
	// ErrClosed: the manager stopped before the backend confirmed; the
	// revocation stays queued and the next start finishes it.
	ErrClosed = revocation.ErrClosed
)

// Withdraw takes the credentials of a published volume back while its pod
// runs: the pod gave them back (reason "given back") or an admin killed
// them ("killed"). Under the volume's lock, in this order:
//
//  1. the volume is recorded as withdrawn (before anything else, so that
//     no crash from here on brings a credential back: recovery finishes
//     the withdrawal and never re-issues);
//  2. its files are removed at once (the pod sees its volume, still
//     mounted, empty but for the lease socket);
//  3. the revocation of every lease the volume holds (its own, a
//     rotation's, its tasks') is queued durably and their records dropped;
//  4. the volume's record names no lease any more.
//
// From then on a republish returns OK without issuing, renewals stop, and
// Unpublish cleans the volume up as usual. confirmed receives one value
// once the backend answered for every lease: nil when it revoked them all,
// an error wrapping provider.ErrNotRevocable when it cannot revoke one (an
// STS session: it lives to its expiry, as the audit says), or ErrClosed if
// the manager stopped first (the revocation stays queued). Withdrawing a withdrawn volume is fine:
// confirmed then reports on whatever of it is still queued.
func (m *Manager) Withdraw(ctx context.Context, volumeID, reason string) (confirmed <-chan error, err error) {
	h, err := m.lock(ctx, volumeID)
	if err != nil {
		return nil, err
	}
	defer h.Unlock()
	v, err := m.loaded(ctx, h)
	if err != nil {
		return nil, fmt.Errorf("%w: recovering the volume's earlier record: %w", provider.ErrUnavailable, err)
	}
	if v == nil {
		return nil, fmt.Errorf("%w: %s", ErrUnknownVolume, volumeID)
	}
	if meta := v.Meta(); meta.State != StateWithdrawn {
		meta.State, meta.WithdrawnAt, meta.WithdrawReason = StateWithdrawn, m.clock.Now().UTC(), reason
		if err := m.opts.Store.WriteMetadata(meta); err != nil {
			return nil, fmt.Errorf("recording the withdrawal: %w", err)
		}
		v.SetMeta(h, meta)
		v.Disarm(h)
	}
	ids, err := m.settleWithdrawn(h, v, reason)
	if err != nil {
		return nil, err
	}
	return m.revocations.Await(m.ctx.Done(), ids), nil
}

// settleWithdrawn does steps 2 to 4 of Withdraw on v, already recorded as
// withdrawn; recovery calls it too. It returns the IDs of the leases whose
// revocation is queued, and keeps v in memory (its pod still runs).
func (m *Manager) settleWithdrawn(h *volume.Held, v *volume.Volume, reason string) ([]string, error) {
	id := v.ID()
	if err := m.opts.Store.WriteFiles(id, v.GID(), nil); err != nil {
		return nil, fmt.Errorf("removing the withdrawn volume's files: %w", err)
	}
	v.SetDigest(h, volume.Digest(nil))
	v.ClearTasks(h)
	meta := v.Meta()
	leases, err := m.heldLeases(meta, v.Lease())
	if err != nil {
		return nil, err
	}
	ids := make([]string, 0, len(leases))
	for _, l := range leases {
		ids = append(ids, l.ID)
	}
	// Waiters before the queue: a worker may confirm at once.
	m.revocations.Watch(ids)
	for _, l := range leases {
		if err := m.enqueue(l, meta, reason); err != nil {
			m.revocations.Unwatch(ids)
			return nil, fmt.Errorf("queueing the revocation: %w", err)
		}
	}
	for _, l := range leases {
		if err := m.opts.Store.DeleteLease(id, l.ID); err != nil {
			klog.ErrorS(err, "Removing the record of a queued lease", "leaseID", l.ID)
		}
	}
	if meta.LeaseID != "" {
		meta.WithdrawnLease = meta.LeaseID
	}
	meta.LeaseID, meta.PendingLeaseID, meta.Tasks = "", "", nil
	if err := m.opts.Store.WriteMetadata(meta); err != nil {
		// Still withdrawn; recovery queues what it names again (revoking
		// twice is harmless).
		klog.ErrorS(err, "Recording a withdrawn volume's leases as queued", "volumeID", id)
	} else {
		v.SetMeta(h, meta)
	}
	if len(ids) == 0 {
		// Withdrawn before: report on whatever of it is still queued.
		ids = m.revocations.WatchVolume(id)
	}
	return ids, nil
}

// heldLeases is every lease the volume holds (state.Metadata.Held), with
// what each record holds.
func (m *Manager) heldLeases(meta Metadata, cur provider.Lease) ([]provider.Lease, error) {
	records, err := m.opts.Store.ListLeases(meta.VolumeID)
	if err != nil {
		return nil, err
	}
	return meta.Held(cur, records), nil
}
