package cli

import (
	"context"
	"errors"
	"time"

	"k8s.io/client-go/rest"
	"k8s.io/klog/v2"

	"github.com/ephemeral-secrets/csi-driver/pkg/events"
	"github.com/ephemeral-secrets/csi-driver/pkg/inventory/record"
	"github.com/ephemeral-secrets/csi-driver/pkg/lease"
)

// ReasonCredentialWithdrawn is the reason of the pod's Warning event when
// its volume's credential record was deleted (the kill switch).
const ReasonCredentialWithdrawn = "CredentialWithdrawn"

// watchInventory runs, until ctx is done, the watcher of the node's
// Credential records: a record whose deletion someone asked for while it
// was live (an admin's kill switch; its Pod's deletion), or the tombstone
// a kill leaves (seen at start-up when the node was down), withdraws the
// volume: its files go at once, its leases are revoked, and it is never
// issued again while its pod lives. The pod gets a Warning event saying
// why.
//
// A record being deleted loses the node's finalizer as soon as the node
// no longer holds its lease (read from the state directory, store): an
// unrevocable one (STS) does not hold its namespace's deletion until it
// expires.
func watchInventory(ctx context.Context, cfg *rest.Config, node string, mgr *lease.Manager, store lease.MetadataReader, sink events.Sink) error {
	c, err := record.NewClient(cfg)
	if err != nil {
		return err
	}
	w := record.NewNodeWatcher(c, node, func(ctx context.Context, volumeID, leaseID, reason string) error {
		if volumeID == "" {
			return nil // a record of an issuer that did not know the volume
		}
		pod, known := mgr.PodOf(volumeID)
		// A kill is told twice (the record's deletion, then its
		// tombstone): the pod hears of it once.
		before, _ := mgr.Info(volumeID)
		_, err := mgr.Withdraw(ctx, volumeID, "killed: "+reason)
		if errors.Is(err, lease.ErrUnknownVolume) {
			return nil // unpublished meanwhile: its revocation is queued already
		}
		if err != nil {
			return err
		}
		klog.InfoS("Withdrew a volume whose credential record was deleted", "volumeID", volumeID, "leaseID", leaseID, "reason", reason)
		if sink != nil && known && before.Withdrawn == "" {
			sink.Warning(pod, ReasonCredentialWithdrawn, "the volume's credential was withdrawn ("+reason+
				"): its files are removed and it is not issued again while this pod runs")
		}
		return nil
	}, 10*time.Minute)
	w.ReleaseWhenDone(func(leaseID string) (bool, error) { return holdsLease(store, leaseID) })
	go func() {
		if err := w.Run(ctx); err != nil {
			klog.ErrorS(err, "Credential record watcher stopped")
		}
	}()
	return nil
}

// holdsLease tells whether the node still holds leaseID: a live lease of
// a volume (or of one of its tasks), or a revocation not yet confirmed.
func holdsLease(store lease.MetadataReader, leaseID string) (bool, error) {
	inv, err := lease.ReadInventory(store)
	if err != nil {
		return false, err
	}
	for _, l := range inv.Live {
		if l.LeaseID == leaseID {
			return true, nil
		}
	}
	for _, p := range inv.Pending {
		if p.LeaseID == leaseID {
			return true, nil
		}
	}
	return false, nil
}

// withdrawLease withdraws the volume that holds leaseID (its own lease, a
// rotation's or a task's): the in-process issuer's kill of a credential
// used from an address none expected. A lease no volume holds any more
// was given back or unpublished meanwhile: its revocation is queued.
func withdrawLease(ctx context.Context, mgr *lease.Manager, store lease.MetadataReader, leaseID, reason string) error {
	inv, err := lease.ReadInventory(store)
	if err != nil {
		return err
	}
	for _, l := range inv.Live {
		if l.LeaseID != leaseID || l.VolumeID == "" {
			continue
		}
		_, err := mgr.Withdraw(ctx, l.VolumeID, reason)
		if errors.Is(err, lease.ErrUnknownVolume) {
			return nil
		}
		if err == nil {
			klog.InfoS("Withdrew a volume whose credential was used from an address none expected", "volumeID", l.VolumeID, "leaseID", leaseID)
		}
		return err
	}
	return nil
}
