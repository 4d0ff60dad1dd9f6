package lease

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"k8s.io/klog/v2"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/storage"
)

var (
	// ErrUnknownVolume: no volume of that ID is published on the node.
	ErrUnknownVolume = errors.New("no such volume on this node")
	// ErrClosed: the manager stopped before the backend confirmed; the
	// revocation stays queued and the next start finishes it.
	ErrClosed = errors.New("the driver stopped before the backend confirmed the revocation")
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
// Unpublish cleans the volume up as usual. confirmed receives one value:
// nil once the backend confirmed every revocation (an ErrNotRevocable
// one included: it lives to its expiry, as the audit says), or ErrClosed
// if the manager stopped first. Withdrawing a withdrawn volume is fine:
// confirmed then reports on whatever of it is still queued.
func (m *Manager) Withdraw(ctx context.Context, volumeID, reason string) (confirmed <-chan error, err error) {
	if !m.Ready() {
		return nil, fmt.Errorf("%w: %w", provider.ErrUnavailable, ErrNotReady)
	}
	unlock, err := m.locks.lock(ctx, volumeID)
	if err != nil {
		return nil, fmt.Errorf("%w: waiting for another operation on the volume: %w", provider.ErrUnavailable, err)
	}
	defer unlock()
	v, err := m.loaded(ctx, volumeID)
	if err != nil {
		return nil, fmt.Errorf("%w: recovering the volume's earlier record: %w", provider.ErrUnavailable, err)
	}
	if v == nil {
		return nil, fmt.Errorf("%w: %s", ErrUnknownVolume, volumeID)
	}
	if v.meta.State != storage.StateWithdrawn {
		meta := v.meta
		meta.State, meta.WithdrawnAt, meta.WithdrawReason = storage.StateWithdrawn, time.Now().UTC(), reason
		if err := m.opts.Store.WriteMetadata(meta); err != nil {
			return nil, fmt.Errorf("recording the withdrawal: %w", err)
		}
		m.mu.Lock()
		v.meta = meta
		if v.timer != nil {
			v.timer.Stop()
		}
		v.renewAt = time.Time{}
		m.mu.Unlock()
	}
	ids, err := m.settleWithdrawn(v, reason)
	if err != nil {
		return nil, err
	}
	return m.await(ids), nil
}

// settleWithdrawn does steps 2 to 4 of Withdraw on v, already recorded as
// withdrawn; recovery calls it too. It returns the IDs of the leases whose
// revocation is queued, and keeps v in memory (its pod still runs).
func (m *Manager) settleWithdrawn(v *volume, reason string) ([]string, error) {
	id := v.meta.VolumeID
	if err := m.opts.Store.WriteFiles(id, v.gid, nil); err != nil {
		return nil, fmt.Errorf("removing the withdrawn volume's files: %w", err)
	}
	m.mu.Lock()
	v.digest = digest(nil)
	m.mu.Unlock()
	leases, err := m.heldLeases(v.meta, v.lease)
	if err != nil {
		return nil, err
	}
	ids := make([]string, 0, len(leases))
	for _, l := range leases {
		ids = append(ids, l.ID)
	}
	// Waiters before the queue: the worker may confirm at once.
	m.watch(ids)
	for _, l := range leases {
		if err := m.enqueue(l, v.meta, reason); err != nil {
			m.unwatch(ids)
			return nil, fmt.Errorf("queueing the revocation: %w", err)
		}
	}
	for _, l := range leases {
		if err := m.opts.Store.DeleteLease(id, l.ID); err != nil {
			klog.ErrorS(err, "Removing the record of a queued lease", "leaseID", l.ID)
		}
	}
	meta := v.meta
	meta.LeaseID, meta.PendingLeaseID = "", ""
	if err := m.opts.Store.WriteMetadata(meta); err != nil {
		// Still withdrawn; recovery queues what it names again (revoking
		// twice is harmless).
		klog.ErrorS(err, "Recording a withdrawn volume's leases as queued", "volumeID", id)
	} else {
		m.mu.Lock()
		v.meta = meta
		m.mu.Unlock()
	}
	if len(ids) == 0 {
		// Withdrawn before: report on whatever of it is still queued.
		if q, err := m.opts.Store.ListRevocations(); err == nil {
			for _, r := range q {
				if r.VolumeID == id {
					ids = append(ids, r.Lease.ID)
				}
			}
			m.watch(ids)
			for _, lid := range slices.Clone(ids) {
				if !m.queued(lid) {
					m.confirm(lid)
				}
			}
		}
	}
	return ids, nil
}

// heldLeases is every lease the volume holds: cur first, then every lease
// record, then (by ID alone) what its metadata names without a record.
func (m *Manager) heldLeases(meta storage.Metadata, cur provider.Lease) ([]provider.Lease, error) {
	records, err := m.opts.Store.ListLeases(meta.VolumeID)
	if err != nil {
		return nil, err
	}
	var out []provider.Lease
	seen := map[string]bool{}
	add := func(l provider.Lease) {
		if l.ID != "" && !seen[l.ID] {
			seen[l.ID] = true
			out = append(out, l)
		}
	}
	if meta.LeaseID != "" && cur.ID == meta.LeaseID {
		add(cur)
	}
	for _, l := range records {
		add(l)
	}
	for _, lid := range []string{meta.PendingLeaseID, meta.LeaseID} {
		add(provider.Lease{ID: lid, Provider: meta.Provider, Params: meta.Params})
	}
	return out, nil
}

// watch registers interest in the confirmation of the revocation of ids.
func (m *Manager) watch(ids []string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, id := range ids {
		if _, ok := m.confirmed[id]; !ok {
			m.confirmed[id] = make(chan struct{})
		}
	}
}

// unwatch drops interest in ids without confirming them.
func (m *Manager) unwatch(ids []string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, id := range ids {
		delete(m.confirmed, id)
	}
}

// confirm tells whoever waits for lease id's revocation that the backend
// confirmed it.
func (m *Manager) confirm(id string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if ch, ok := m.confirmed[id]; ok {
		close(ch)
		delete(m.confirmed, id)
	}
}

// await returns a channel that receives nil once the revocation of every
// one of ids is confirmed, or ErrClosed if the manager stops first.
func (m *Manager) await(ids []string) <-chan error {
	out := make(chan error, 1)
	m.mu.Lock()
	chans := make([]chan struct{}, 0, len(ids))
	for _, id := range ids {
		if ch, ok := m.confirmed[id]; ok {
			chans = append(chans, ch)
		}
	}
	m.mu.Unlock()
	go func() {
		for _, ch := range chans {
			select {
			case <-ch:
			case <-m.ctx.Done():
				out <- ErrClosed
				return
			}
		}
		out <- nil
	}()
	return out
}
