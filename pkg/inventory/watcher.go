package inventory

import (
	"context"
	"fmt"
	"time"

	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"

	v1alpha1 "github.com/ephemeral-secrets/csi-driver/pkg/apis/ephemeralsecrets/v1alpha1"
)

// WithdrawFunc is told that the record of a lease on this node is being
// deleted (the kill switch, the Pod's deletion): the node empties the
// volume and stops renewing the lease (the lease manager's Withdraw). It
// must be idempotent, and return nil for a volume or lease the node no
// longer holds (its own revocation deletes the record too); an error
// (the manager not ready yet, say) is retried with backoff.
type WithdrawFunc func(ctx context.Context, volumeID, leaseID, reason string) error

// NodeWatcher watches the records of one node (by its label) and calls a
// WithdrawFunc for each record being deleted, until it succeeds once.
type NodeWatcher struct {
	node     string
	informer cache.SharedIndexInformer
	withdraw WithdrawFunc
	limiter  workqueue.TypedRateLimiter[withdrawal]
}

// NewNodeWatcher watches node's records through c. A failed withdrawal
// is retried after a backoff from 100 ms to 30 s.
func NewNodeWatcher(c *Client, node string, withdraw WithdrawFunc, resync time.Duration) *NodeWatcher {
	sel := labels.Set{v1alpha1.LabelNode: labelValue(node)}.String()
	return &NodeWatcher{
		node: node, informer: NewInformer(c, sel, resync), withdraw: withdraw,
		limiter: workqueue.NewTypedItemExponentialFailureRateLimiter[withdrawal](100*time.Millisecond, 30*time.Second),
	}
}

// withdrawal is one call of the WithdrawFunc.
type withdrawal struct{ volumeID, leaseID, reason string }

// Run watches until ctx is done. Calls of the WithdrawFunc happen one at
// a time, outside the informer's goroutine, and are retried until they
// succeed (or the watcher stops).
func (w *NodeWatcher) Run(ctx context.Context) error {
	queue := workqueue.NewTypedRateLimitingQueue(w.limiter)
	defer queue.ShutDown()
	seen := map[string]bool{} // lease IDs told, touched by the informer's goroutine only
	tell := func(obj any, gone bool) {
		if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
			obj = d.Obj
		}
		c, ok := obj.(*v1alpha1.Credential)
		if !ok || c.Spec.Node != w.node {
			return
		}
		if (c.DeletionTimestamp != nil || gone) && !seen[c.Spec.LeaseID] {
			seen[c.Spec.LeaseID] = true
			queue.Add(withdrawal{c.Spec.VolumeID, c.Spec.LeaseID, reason(c)})
		}
		if gone {
			delete(seen, c.Spec.LeaseID)
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
			} else {
				queue.Forget(item)
			}
			queue.Done(item)
		}
	}()
	w.informer.Run(ctx.Done())
	return nil
}

// HasSynced tells whether the watcher has listed the node's records.
func (w *NodeWatcher) HasSynced() bool { return w.informer.HasSynced() }

// reason says why a record goes, for the node's audit record and the
// pod's event.
func reason(c *v1alpha1.Credential) string {
	for _, cond := range c.Status.Conditions {
		if cond.Type == v1alpha1.ConditionRevoked && cond.Reason == "PodGone" {
			return "credential record deleted: " + cond.Message
		}
	}
	return fmt.Sprintf("credential record %s/%s deleted", c.Namespace, c.Name)
}
