package inventory

import (
	"context"
	"fmt"
	"slices"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	corev1client "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"

	v1alpha1 "github.com/ephemeral-secrets/csi-driver/pkg/apis/ephemeralsecrets/v1alpha1"
	"github.com/ephemeral-secrets/csi-driver/pkg/credential"
)

// RevokeFunc revokes the credential of a record (the issuer's Drop). It
// must be idempotent: a credential already gone is no error.
type RevokeFunc func(ctx context.Context, e credential.Record) error

// Controller is the issuer's side of the inventory:
//   - a record being deleted that holds the issuer's finalizer (the Pod's
//     deletion through the garbage collector, or an admin's delete: the
//     kill switch) has its credential revoked, then goes; a failed
//     revocation keeps the finalizer and is retried with backoff;
//   - a record whose Pod is gone (the garbage collector lagging, or not
//     running, or a Pod of the same name and another UID) is deleted;
//   - a record it revokes whose Pod still lives (the kill switch) leaves
//     a tombstone first (tombstone.go): the volume is never issued again
//     while the pod lives;
//   - a record of a node-revoked credential (Vault, AWS) being deleted
//     whose node never released it goes once the credential has expired,
//     since the backend has then ended it.
//
// The issuer runs it with a RevokeFunc, on its elected leader only
// (ControllerOptions.RevokeOnly: its records alone). The housekeeper runs
// it without one (NewHousekeeper), whatever the profile: every record
// but the revocation, and the hand-over of a record being deleted whose
// holder is gone (ControllerOptions.Holders).
type Controller struct {
	client  *Client
	inf     cache.SharedIndexInformer
	pods    corev1client.PodsGetter
	revoke  RevokeFunc
	opts    ControllerOptions
	issuer  store
	node    store
	queue   workqueue.TypedRateLimitingInterface[string]
	nowFunc func() time.Time
}

// ControllerOptions tune a Controller; the zero value is the default.
type ControllerOptions struct {
	// RateLimiter spaces the retries of a record whose reconcile failed
	// (default: client-go's controller default, per-record exponential
	// backoff and an overall bucket).
	RateLimiter workqueue.TypedRateLimiter[string]
	// ExpiryGrace is how long past its expiry a node-revoked credential's
	// record, being deleted, waits for its node (default 1 min).
	ExpiryGrace time.Duration
	// PodCheckInterval is how often every record is looked at again, so
	// that the record of a pod gone is deleted even when the garbage
	// collector missed it (default 5 min).
	PodCheckInterval time.Duration
	// RevokeOnly limits the Controller to the records the issuer holds
	// (the issuer's, beside a housekeeper that does the rest).
	RevokeOnly bool
	// Holders, when set, tells whether a record's holder is there: a
	// record being deleted whose holder has been gone for HandoverAfter
	// (counted from the deletion) is let go; its credential ends at its
	// expiry (a PostgreSQL role is also dropped by the issuer when it is
	// back: no record holds it).
	Holders Holders
	// HandoverAfter is how long a record being deleted waits for a holder
	// seen gone (default 1 min).
	HandoverAfter time.Duration
}

// NewController reconciles the records of informer (NewInformer with all
// records, shared with the Recorder). pods tells whether a record's Pod
// still exists; revoke revokes a credential.
func NewController(c *Client, informer cache.SharedIndexInformer, pods corev1client.PodsGetter, revoke RevokeFunc, opts ControllerOptions) *Controller {
	if opts.ExpiryGrace == 0 {
		opts.ExpiryGrace = time.Minute
	}
	if opts.PodCheckInterval == 0 {
		opts.PodCheckInterval = 5 * time.Minute
	}
	if opts.HandoverAfter == 0 {
		opts.HandoverAfter = time.Minute
	}
	return &Controller{
		client: c, inf: informer, pods: pods, revoke: revoke, opts: opts, nowFunc: time.Now,
		issuer: store{client: c, finalizer: v1alpha1.FinalizerRevoke, cache: informer},
		node:   store{client: c, finalizer: v1alpha1.FinalizerNodeRevoke, cache: informer},
	}
}

// Run reconciles with workers goroutines until ctx is done. The informer
// must be running (the caller starts it, shared with the Recorder).
func (c *Controller) Run(ctx context.Context, workers int) error {
	rl := c.opts.RateLimiter
	if rl == nil {
		rl = workqueue.DefaultTypedControllerRateLimiter[string]()
	}
	c.queue = workqueue.NewTypedRateLimitingQueueWithConfig(rl,
		workqueue.TypedRateLimitingQueueConfig[string]{Name: "credentials"})
	defer c.queue.ShutDown()
	enqueue := func(obj any) {
		if key, err := cache.MetaNamespaceKeyFunc(obj); err == nil {
			c.queue.Add(key)
		}
	}
	reg, err := c.inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		// A new record (and each at start-up) is checked for its pod; after
		// that, only the start of its deletion, a change of its finalizers
		// and the informer's resync need a look. Not its status updates:
		// each renewal is one, and so is the controller's own record of a
		// failed revocation, which must wait for its backoff.
		AddFunc: enqueue,
		UpdateFunc: func(old, obj any) {
			o, n := old.(*v1alpha1.Credential), obj.(*v1alpha1.Credential)
			if o.ResourceVersion == n.ResourceVersion || (o.DeletionTimestamp == nil) != (n.DeletionTimestamp == nil) ||
				!slices.Equal(o.Finalizers, n.Finalizers) {
				enqueue(obj)
			}
		},
	})
	if err != nil {
		return fmt.Errorf("inventory controller: %w", err)
	}
	defer func() { _ = c.inf.RemoveEventHandler(reg) }()
	if !cache.WaitForCacheSync(ctx.Done(), reg.HasSynced) {
		return fmt.Errorf("inventory controller: cache not synced: %w", ctx.Err())
	}
	for range max(workers, 1) {
		go wait.UntilWithContext(ctx, c.work, time.Second)
	}
	go wait.JitterUntilWithContext(ctx, func(context.Context) {
		for _, key := range c.inf.GetIndexer().ListKeys() {
			c.queue.Add(key)
		}
	}, c.opts.PodCheckInterval, 0.1, false)
	<-ctx.Done()
	return nil
}

// work reconciles keys until the queue shuts down.
func (c *Controller) work(ctx context.Context) {
	for {
		key, shutdown := c.queue.Get()
		if shutdown {
			return
		}
		if err := c.reconcile(ctx, key); err != nil && ctx.Err() == nil {
			klog.ErrorS(err, "Reconciling a credential record", "credential", key)
			c.queue.AddRateLimited(key)
		} else if err == nil {
			c.queue.Forget(key)
		}
		c.queue.Done(key)
	}
}

// reconcile moves the record key one step: it reads the world (the
// cache, then the API server before acting) and is safe to repeat.
func (c *Controller) reconcile(ctx context.Context, key string) error {
	obj, exists, err := c.inf.GetIndexer().GetByKey(key)
	if err != nil || !exists {
		return err
	}
	cred := obj.(*v1alpha1.Credential)
	deleting := cred.DeletionTimestamp != nil
	switch {
	case deleting && slices.Contains(cred.Finalizers, v1alpha1.FinalizerRevoke) && c.revoke != nil:
		return c.revokeRecord(ctx, cred.Namespace, cred.Name)
	case deleting && slices.Contains(cred.Finalizers, v1alpha1.FinalizerRevoke):
		return c.handOverIssuerRecord(ctx, key, cred)
	case c.opts.RevokeOnly:
		return nil
	case deleting && slices.Contains(cred.Finalizers, v1alpha1.FinalizerNodeRevoke):
		return c.expireNodeRecord(ctx, key, cred)
	case !deleting:
		return c.checkPod(ctx, cred)
	}
	return nil
}

// revokeRecord revokes the credential of a record being deleted, then
// removes the issuer's finalizer. It reads the record fresh first: a
// cache behind the API server must not revoke twice.
func (c *Controller) revokeRecord(ctx context.Context, namespace, name string) error {
	cred, err := c.client.Get(ctx, namespace, name)
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return err
	}
	if cred.DeletionTimestamp == nil || !slices.Contains(cred.Finalizers, v1alpha1.FinalizerRevoke) {
		return nil
	}
	if cred.Status.State != v1alpha1.StateRevoking {
		err := c.setCondition(ctx, cred, v1alpha1.StateRevoking, metav1.ConditionFalse, "Revoking", "the record is being deleted: revoking the credential")
		if err != nil {
			return err
		}
	}
	// The tombstone before the revocation: once the role is gone, the
	// node's next renewal fails and it asks for a new credential, which
	// the tombstone must be there to refuse. A tombstone that cannot be
	// written does not hold the kill back: the credential is revoked, and
	// the record (and its finalizer) stays until the tombstone is written.
	tombErr := c.leaveTombstone(ctx, cred)
	if err := c.revoke(ctx, entry(cred)); err != nil {
		// The reason only: the revoker's errors carry no secret, but a
		// condition is no place for a backend's long message either.
		_ = c.setCondition(ctx, cred, v1alpha1.StateRevoking, metav1.ConditionFalse, "RevokeFailed", truncate(err.Error(), 1024))
		return fmt.Errorf("revoking lease %s: %w", cred.Spec.LeaseID, err)
	}
	klog.InfoS("Revoked the credential of a deleted record", "credential", klog.KObj(cred), "leaseID", cred.Spec.LeaseID)
	if tombErr != nil {
		_ = c.setCondition(ctx, cred, v1alpha1.StateRevoking, metav1.ConditionTrue, "TombstoneFailed",
			truncate("the credential is revoked; the volume's tombstone could not be written (retrying): "+tombErr.Error(), 1024))
		return fmt.Errorf("lease %s revoked, its volume's tombstone not written: %w", cred.Spec.LeaseID, tombErr)
	}
	return c.issuer.release(ctx, namespace, name)
}

// expireNodeRecord lets a node-revoked record being deleted go once its
// credential has expired: its node did not release it (it is down, or
// gone), and the backend has ended the credential.
// With Holders, it goes sooner when the node plugin of its node is gone
// (HandoverAfter after its deletion): nobody is left to revoke it.
func (c *Controller) expireNodeRecord(ctx context.Context, key string, cred *v1alpha1.Credential) error {
	wait := time.Duration(-1) // no expiry known: only the node, or a hand-over, lets it go
	if cred.Status.ExpiresAt != nil {
		wait = cred.Status.ExpiresAt.Add(c.opts.ExpiryGrace).Sub(c.nowFunc())
		if wait <= 0 {
			_ = c.setCondition(ctx, cred, v1alpha1.StateRevoked, metav1.ConditionTrue, "Expired",
				"the node did not revoke the credential; it expired at "+cred.Status.ExpiresAt.UTC().Format(time.RFC3339))
			return c.node.release(ctx, cred.Namespace, cred.Name)
		}
	}
	if c.opts.Holders != nil {
		present, err := c.opts.Holders.NodePluginPresent(ctx, cred.Spec.Node)
		if err != nil {
			return fmt.Errorf("is the node plugin of %s there: %w", cred.Spec.Node, err)
		}
		if !present {
			return c.handOver(ctx, key, cred, c.node, "the node plugin of "+cred.Spec.Node+" is gone")
		}
		// Looked at again: the node plugin may go meanwhile.
		wait = c.soonest(wait, c.opts.HandoverAfter)
	}
	if wait > 0 {
		c.queue.AddAfter(key, wait)
	}
	return nil
}

// soonest is the shorter of two waits, a negative one being none.
func (c *Controller) soonest(a, b time.Duration) time.Duration {
	if a < 0 || b < a {
		return b
	}
	return a
}

// handOverIssuerRecord lets an issuer's record being deleted go when the
// issuer has no leader (it is down, scaled to zero, or uninstalled): the
// role ends at its VALID UNTIL, and the issuer drops it when it is back
// (no record holds it), as does the node's queued revocation.
func (c *Controller) handOverIssuerRecord(ctx context.Context, key string, cred *v1alpha1.Credential) error {
	if c.opts.Holders == nil {
		return nil
	}
	present, err := c.opts.Holders.IssuerPresent(ctx)
	if err != nil {
		return fmt.Errorf("is the issuer there: %w", err)
	}
	if present {
		c.queue.AddAfter(key, c.opts.HandoverAfter)
		return nil
	}
	return c.handOver(ctx, key, cred, c.issuer, "the issuer has no leader")
}

// handOver lets a record being deleted go once it has waited
// HandoverAfter since its deletion for a holder that is gone (why).
func (c *Controller) handOver(ctx context.Context, key string, cred *v1alpha1.Credential, s store, why string) error {
	if wait := cred.DeletionTimestamp.Add(c.opts.HandoverAfter).Sub(c.nowFunc()); wait > 0 {
		c.queue.AddAfter(key, wait)
		return nil
	}
	msg := why + ": the record goes without its revocation"
	if cred.Status.ExpiresAt != nil {
		msg += "; the backend ends the credential at " + cred.Status.ExpiresAt.UTC().Format(time.RFC3339)
	}
	_ = c.setCondition(ctx, cred, "", metav1.ConditionFalse, ReasonHandedOver, msg)
	klog.InfoS("Handed over a credential record whose holder is gone", "credential", klog.KObj(cred), "leaseID", cred.Spec.LeaseID, "why", why)
	return s.release(ctx, cred.Namespace, cred.Name)
}

// ReasonHandedOver is the reason of the Revoked condition of a record let
// go without a revocation: its holder was gone (the housekeeper), or the
// driver was being uninstalled (HandOverAll).
const ReasonHandedOver = "HandedOver"

// checkPod deletes a record whose Pod is gone: its deletion then revokes.
func (c *Controller) checkPod(ctx context.Context, cred *v1alpha1.Credential) error {
	pod, err := c.pods.Pods(cred.Namespace).Get(ctx, cred.Spec.Pod.Name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
	case err != nil:
		return fmt.Errorf("reading the pod of %s/%s: %w", cred.Namespace, cred.Name, err)
	case string(pod.UID) != cred.Spec.Pod.UID:
	default:
		return nil
	}
	msg := fmt.Sprintf("pod %s (uid %s) no longer exists", cred.Spec.Pod.Name, cred.Spec.Pod.UID)
	_ = c.setCondition(ctx, cred, cred.Status.State, metav1.ConditionFalse, "PodGone", msg)
	uid := cred.UID
	err = c.client.Delete(ctx, cred.Namespace, cred.Name, metav1.DeleteOptions{Preconditions: &metav1.Preconditions{UID: &uid}})
	if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
		return fmt.Errorf("deleting %s/%s: %w", cred.Namespace, cred.Name, err)
	}
	klog.InfoS("Deleted the credential record of a pod that is gone", "credential", klog.KObj(cred), "pod", cred.Spec.Pod.Name)
	return nil
}

// setCondition records the state and the Revoked condition of a record.
func (c *Controller) setCondition(ctx context.Context, cred *v1alpha1.Credential, state v1alpha1.State, status metav1.ConditionStatus, reason, msg string) error {
	err := c.issuer.updateStatus(ctx, cred.Namespace, cred.Name, func(fresh *v1alpha1.Credential) error {
		if fresh.UID != cred.UID {
			return apierrors.NewNotFound(v1alpha1.SchemeGroupVersion.WithResource(v1alpha1.Resource).GroupResource(), cred.Name)
		}
		if state != "" {
			fresh.Status.State = state
		}
		meta.SetStatusCondition(&fresh.Status.Conditions, metav1.Condition{
			Type: v1alpha1.ConditionRevoked, Status: status, Reason: reason, Message: msg,
		})
		return nil
	})
	if apierrors.IsNotFound(err) {
		return nil
	}
	return err
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n]
}
