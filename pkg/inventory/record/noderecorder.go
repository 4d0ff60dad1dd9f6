package record

import (
	"context"
	"errors"

	v1alpha1 "github.com/ephemeral-secrets/csi-driver/pkg/apis/ephemeralsecrets/v1alpha1"
	"github.com/ephemeral-secrets/csi-driver/pkg/credential"
)

// NodeRecorder records the credentials a node plugin revokes itself
// (Vault, AWS), so that the inventory covers every provider. Its records
// are held by the node's finalizer (FinalizerNodeRevoke) until Revoked.
type NodeRecorder struct {
	s Store
}

// NewNodeRecorder records through c (with the node plugin's identity).
func NewNodeRecorder(c *Client) *NodeRecorder {
	return &NodeRecorder{s: Store{Client: c, Finalizer: v1alpha1.FinalizerNodeRevoke}}
}

// Issued records that the backend holds e until e.ExpiresAt: it creates
// the record the first time, updates it after a renewal. It returns
// credential.ErrRecordGone when the record was deleted: the node must then revoke e.
func (r *NodeRecorder) Issued(ctx context.Context, e credential.Record) error {
	if err := r.s.SetStatus(ctx, e, Issued(e)); !errors.Is(err, credential.ErrRecordGone) {
		return err
	}
	// No record yet, or one being deleted (create says which).
	if _, _, err := r.s.Create(ctx, e); err != nil {
		return err
	}
	return r.s.SetStatus(ctx, e, Issued(e))
}

// Revoked records that e is revoked: the node's finalizer is removed and
// the record deleted. A record already gone is no error.
func (r *NodeRecorder) Revoked(ctx context.Context, e credential.Record) error {
	return r.s.Release(ctx, e.Pod.Namespace, Name(e.LeaseID))
}
