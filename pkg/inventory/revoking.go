package inventory

import (
	"slices"
	"time"

	"k8s.io/client-go/tools/cache"

	v1alpha1 "github.com/ephemeral-secrets/csi-driver/pkg/apis/ephemeralsecrets/v1alpha1"
	"github.com/ephemeral-secrets/csi-driver/pkg/metrics"
)

// Revoking summarises, for the issuer's metrics, the records of store (an
// informer's cache of every Credential) that are being deleted and still
// hold a revoker's finalizer: their credential is not revoked yet. The
// age of each is the time since its deletion was asked for, now - its
// deletionTimestamp, so that a record the controller never reached (no
// leader) counts as much as one whose revocation keeps failing.
//
// Every replica's cache holds every record: each replica reports the same
// backlog, the leader's included, and a leader that is stuck does not hide
// it. No label names a namespace, a pod or a role: the alert needs the
// oldest, and `kubectl get credentials -A` names them.
func Revoking(store cache.Store, now time.Time) metrics.Revoking {
	var r metrics.Revoking
	for _, obj := range store.List() {
		c, ok := obj.(*v1alpha1.Credential)
		if !ok || c.DeletionTimestamp == nil {
			continue
		}
		var b *metrics.Backlog
		switch {
		case slices.Contains(c.Finalizers, v1alpha1.FinalizerRevoke):
			b = &r.Issuer
		case slices.Contains(c.Finalizers, v1alpha1.FinalizerNodeRevoke):
			b = &r.Node
		default:
			continue // released: the garbage collector removes it now
		}
		b.Count++
		b.Oldest = max(b.Oldest, now.Sub(c.DeletionTimestamp.Time))
	}
	return r
}
