package cli

import (
	"context"

	"github.com/ephemeral-secrets/csi-driver/pkg/credential"
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

// mine is r as the node records it: on its own node.
func (n nodeRecords) mine(r credential.Record) credential.Record {
	r.Node = n.node
	return r
}

// Issued creates or updates the record; a record being deleted is
// credential.ErrRecordGone.
func (n nodeRecords) Issued(ctx context.Context, r credential.Record) error {
	if !recordedHere(r.Provider) {
		return nil
	}
	return n.rec.Issued(ctx, n.mine(r))
}

// Revoked releases the node's finalizer and deletes the record.
func (n nodeRecords) Revoked(ctx context.Context, r credential.Record) error {
	if !recordedHere(r.Provider) {
		return nil
	}
	return n.rec.Revoked(ctx, n.mine(r))
}
