package lease

import (
	"errors"
	"time"

	"k8s.io/klog/v2"

	"github.com/ephemeral-secrets/csi-driver/pkg/credential"
	"github.com/ephemeral-secrets/csi-driver/pkg/lease/outbox"
	"github.com/ephemeral-secrets/csi-driver/pkg/lease/revocation"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// The records of each lease outside the node (the cluster's inventory):
// the manager notes issues, renewals and confirmed revocations to its
// outbox (pkg/lease/outbox), which makes the calls from a goroutine of its
// own, never under a volume's lock, and retries them; a failure never
// fails a publish or holds a revocation back. Each record is a
// credential.Record, the one the audit trail and `inventory` render too.

// Records keeps a record of each credential outside the node.
type Records = outbox.Records

// recordOf is the record of l, the lease of the volume meta or of one of
// its tasks.
func recordOf(meta Metadata, l provider.Lease) credential.Record {
	return credential.Record{
		VolumeID: meta.VolumeID, Pod: meta.Pod, Class: meta.Class, Provider: meta.Provider,
		Role: l.Role, LeaseID: l.ID, Task: meta.TaskOf(l.ID), IssuedAt: l.IssuedAt, ExpiresAt: l.ExpiresAt,
	}
}

// noteIssued queues the record of l, v's lease (or one of its tasks').
func (m *Manager) noteIssued(meta Metadata, l provider.Lease) {
	m.records.Issued(recordOf(meta, l))
}

// noteRevoked queues the release of the record of a lease whose
// revocation the backend confirmed. One the backend cannot revoke (an STS
// session) lives until it expires, and so does its record: the inventory
// shows what is alive, and deleting the record then (the kill switch)
// could stop nothing anyway.
func (m *Manager) noteRevoked(r revocation.Entry, unrevocable bool) {
	var at time.Time
	if unrevocable {
		at = r.Lease.ExpiresAt
	}
	m.records.Revoked(r.Credential(), at)
}

// withdrawGone withdraws the volume of a lease whose record was deleted,
// retrying while the manager is not ready or the volume busy.
func (m *Manager) withdrawGone(rec credential.Record) {
	for attempt := 1; m.ctx.Err() == nil; attempt++ {
		_, err := m.Withdraw(m.ctx, rec.VolumeID, "killed: credential record of lease "+rec.LeaseID+" deleted")
		if err == nil || errors.Is(err, ErrUnknownVolume) {
			return
		}
		klog.ErrorS(err, "Withdrawing a volume whose credential record was deleted; will retry", "volumeID", rec.VolumeID)
		select {
		case <-m.clock.After(m.timing.Backoff(attempt)):
		case <-m.ctx.Done():
		}
	}
}
