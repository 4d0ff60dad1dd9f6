package cli

import (
	"context"
	"errors"
	"fmt"

	"github.com/ephemeral-secrets/csi-driver/pkg/inventory/record"
	"github.com/ephemeral-secrets/csi-driver/pkg/lease"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider/postgres"
)

// nodeRecords records the credentials the node plugin revokes itself
// (Vault, AWS, any provider but postgres) as Credential objects held by
// the node's finalizer: the lease manager's Records.
//
// postgres is left out: whichever transport serves it (the issuer in this
// process, or the cluster's), the provider registered under its name asks
// an issuer, and the cluster's issuer records its credentials itself. (An
// issuer in this process has no inventory: a node given the admin
// configuration in a cluster records no postgres credential.)
type nodeRecords struct {
	rec  *record.NodeRecorder
	node string
}

var _ lease.Records = nodeRecords{}

func newNodeRecords(c *record.Client, node string) nodeRecords {
	return nodeRecords{rec: record.NewNodeRecorder(c), node: node}
}

// recordedHere tells whether the node records a credential of provider p.
func recordedHere(p string) bool { return p != postgres.Name }

func (n nodeRecords) entry(r lease.Record) record.Entry {
	return record.Entry{
		LeaseID: r.LeaseID, VolumeID: r.VolumeID, Pod: r.Pod, Node: n.node, Class: r.Class,
		Provider: r.Provider, Role: r.Role, IssuedAt: r.IssuedAt, ExpiresAt: r.ExpiresAt,
	}
}

// Issued creates or updates the record; a record being deleted is
// lease.ErrRecordGone.
func (n nodeRecords) Issued(ctx context.Context, r lease.Record) error {
	if !recordedHere(r.Provider) {
		return nil
	}
	err := n.rec.Issued(ctx, n.entry(r))
	if errors.Is(err, record.ErrGone) {
		return fmt.Errorf("%w: %w", lease.ErrRecordGone, err)
	}
	return err
}

// Revoked releases the node's finalizer and deletes the record.
func (n nodeRecords) Revoked(ctx context.Context, r lease.Record) error {
	if !recordedHere(r.Provider) {
		return nil
	}
	return n.rec.Revoked(ctx, n.entry(r))
}
