package inventory

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
	store
}

// NewNodeRecorder records through c (with the node plugin's identity).
func NewNodeRecorder(c *Client) *NodeRecorder {
	return &NodeRecorder{store{client: c, finalizer: v1alpha1.FinalizerNodeRevoke}}
}

// Issued records that the backend holds e until e.ExpiresAt: it creates
// the record the first time, updates it after a renewal. It returns
// credential.ErrRecordGone when the record was deleted: the node must then revoke e.
func (r *NodeRecorder) Issued(ctx context.Context, e credential.Record) error {
	if err := r.setStatus(ctx, e, issued(e)); !errors.Is(err, credential.ErrRecordGone) {
		return err
	}
	// No record yet, or one being deleted (create says which).
	if _, _, err := r.create(ctx, e); err != nil {
		return err
	}
	return r.setStatus(ctx, e, issued(e))
}

// Revoked records that e is revoked: the node's finalizer is removed and
// the record deleted. A record already gone is no error.
func (r *NodeRecorder) Revoked(ctx context.Context, e credential.Record) error {
	return r.release(ctx, e.Pod.Namespace, Name(e.LeaseID))
}
