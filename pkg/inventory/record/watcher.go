package record

import (
	"context"
	"fmt"
	"slices"
	"time"

	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"

	v1alpha1 "github.com/ephemeral-secrets/csi-driver/pkg/apis/ephemeralsecrets/v1alpha1"
)

// WithdrawFunc is told that the record of a lease on this node is being
// deleted (the kill switch, the Pod's deletion), or that a tombstone says
// a volume's credential was withdrawn: the node empties the
// volume and stops renewing the lease (the lease manager's Withdraw). It
// must be idempotent, and return nil for a volume or lease the node no
// longer holds (its own revocation deletes the record too); an error
// (the manager not ready yet, say) is retried with backoff.
type WithdrawFunc func(ctx context.Context, volumeID, leaseID, reason string) error

// NodeWatcher watches the records of one node (by its label) and calls a
// WithdrawFunc for each record being deleted and each tombstone, until it
// succeeds once.
type NodeWatcher struct {
	node     string
	informer cache.SharedIndexInformer
	withdraw WithdrawFunc
	limiter  workqueue.TypedRateLimiter[withdrawal]
	release  Store
	holds    HoldsFunc
}

// HoldsFunc tells whether the node still holds a lease: live, or waiting
// in its revocation queue.
type HoldsFunc func(leaseID string) (bool, error)

// ReleaseWhenDone makes the watcher, once it has withdrawn a record being
// deleted, remove the node's finalizer as soon as holds says the node no
// longer holds its lease: revoked, or one the backend cannot revoke (an
// STS session, which lives until its expiry whatever the node does). The
// record, and its namespace's deletion, then wait for nothing more. Call
// it before Run.
func (w *NodeWatcher) ReleaseWhenDone(holds HoldsFunc) { w.holds = holds }

// NewNodeWatcher watches node's records through c. A failed withdrawal
// is retried after a backoff from 100 ms to 30 s.
func NewNodeWatcher(c *Client, node string, withdraw WithdrawFunc, resync time.Duration) *NodeWatcher {
	sel := labels.Set{v1alpha1.LabelNode: LabelValue(node)}.String()
	return &NodeWatcher{
		node: node, informer: NewInformer(c, sel, resync), withdraw: withdraw,
		release: Store{Client: c, Finalizer: v1alpha1.FinalizerNodeRevoke},
		limiter: workqueue.NewTypedItemExponentialFailureRateLimiter[withdrawal](100*time.Millisecond, 30*time.Second),
	}
}

// withdrawal is one call of the WithdrawFunc; release: the record (namespace/name) is
// being deleted and holds the node's finalizer.
type withdrawal struct {
	volumeID, leaseID, reason string
	namespace, name           string
	release                   bool
}

// Run watches until ctx is done. Calls of the WithdrawFunc happen one at
// a time, outside the informer's goroutine, and are retried until they
// succeed (or the watcher stops).
func (w *NodeWatcher) Run(ctx context.Context) error {
	queue := workqueue.NewTypedRateLimitingQueue(w.limiter)
	defer queue.ShutDown()
	seen := map[string]bool{} // records told (namespace/name), touched by the informer's goroutine only
	tell := func(obj any, gone bool) {
		if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
			obj = d.Obj
		}
		c, ok := obj.(*v1alpha1.Credential)
		if !ok || c.Spec.Node != w.node {
			return
		}
		key := c.Namespace + "/" + c.Name
		// A deletion someone asked for while the record was live (a
		// finalizer holds it): the kill switch, or its pod's deletion; or
		// the tombstone a kill leaves, seen however late (the node was
		// down, or the record was revoked and gone before the node saw
		// it). A record that simply vanishes was released by whoever
		// revoked it (an unpublish, a rotation's old lease): nothing to
		// withdraw.
		if (c.DeletionTimestamp != nil || IsTombstone(c)) && !seen[key] {
			seen[key] = true
			queue.Add(withdrawal{volumeID: c.Spec.VolumeID, leaseID: c.Spec.LeaseID, reason: reason(c),
				namespace: c.Namespace, name: c.Name,
				release: c.DeletionTimestamp != nil && slices.Contains(c.Finalizers, v1alpha1.FinalizerNodeRevoke)})
		}
		if gone {
			delete(seen, key)
		}
	}
	_, err := w.informer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { tell(obj, false) },
		UpdateFunc: func(_, obj any) { tell(obj, false) },
		DeleteFunc: func(obj any) { tell(obj, true) },
	})
	if err != nil {
		return fmt.Errorf("inventory watcher: %w", err)
	}
	go func() {
		for {
			item, shutdown := queue.Get()
			if shutdown {
				return
			}
			if err := w.withdraw(ctx, item.volumeID, item.leaseID, item.reason); err != nil && ctx.Err() == nil {
				klog.ErrorS(err, "Withdrawing the volume of a deleted credential record; retrying", "volumeID", item.volumeID, "leaseID", item.leaseID)
				queue.AddRateLimited(item)
			} else if again, err := w.releaseDone(ctx, item); (err != nil || again) && ctx.Err() == nil {
				if err != nil {
					klog.ErrorS(err, "Releasing a deleted credential record the node no longer holds; retrying", "leaseID", item.leaseID)
				}
				queue.AddRateLimited(item)
			} else {
				queue.Forget(item)
			}
			queue.Done(item)
		}
	}()
	w.informer.Run(ctx.Done())
	return nil
}

// releaseDone removes the node's finalizer from a record being deleted
// once the node no longer holds its lease; again: it still does (a
// revocation in flight), look again after a backoff.
func (w *NodeWatcher) releaseDone(ctx context.Context, item withdrawal) (again bool, err error) {
	if !item.release || w.holds == nil {
		return false, nil
	}
	held, err := w.holds(item.leaseID)
	if err != nil || held {
		return held, err
	}
	if err := w.release.Release(ctx, item.namespace, item.name); err != nil {
		return false, err
	}
	klog.V(2).InfoS("Released a deleted credential record the node no longer holds", "credential", item.namespace+"/"+item.name, "leaseID", item.leaseID)
	return false, nil
}

// HasSynced tells whether the watcher has listed the node's records.
func (w *NodeWatcher) HasSynced() bool { return w.informer.HasSynced() }

// reason says why a record goes, for the node's audit record and the
// pod's event.
func reason(c *v1alpha1.Credential) string {
	if cond := meta.FindStatusCondition(c.Status.Conditions, v1alpha1.ConditionWithdrawn); cond != nil && IsTombstone(c) {
		return cond.Message
	}
	for _, cond := range c.Status.Conditions {
		if cond.Type == v1alpha1.ConditionRevoked && cond.Reason == "PodGone" {
			return "credential record deleted: " + cond.Message
		}
	}
	return fmt.Sprintf("credential record %s/%s deleted", c.Namespace, c.Name)
}
