package inventory

import (
	"context"
	"errors"
	"fmt"
	"slices"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/retry"

	v1alpha1 "github.com/ephemeral-secrets/csi-driver/pkg/apis/ephemeralsecrets/v1alpha1"
	"github.com/ephemeral-secrets/csi-driver/pkg/credential"
	"github.com/ephemeral-secrets/csi-driver/pkg/inventory/record"
)

// Recorder is the issuer's Inventory (and its Withdrawals; pkg/cli,
// which wires the two, checks both): it records each credential of the
// engines the issuer hosts as a Credential that the issuer's finalizer
// (FinalizerRevoke) holds until the credential is dropped.
type Recorder struct {
	store
	informer cache.SharedIndexInformer
	// seen tells when the informer has delivered a record Issuing created
	// (Withdrawn then reads the cache; nil without an informer).
	seen *sightings
	// warner sends the Warning events of UsedElsewhere (use.go).
	warner PodWarner
}

// NewRecorder records through c. informer (NewInformer, all records; it
// may be nil) answers Tracked and finds records by lease ID once it has
// synced; the Recorder asks the API server until then.
func NewRecorder(c *Client, informer cache.SharedIndexInformer, opts ...RecorderOption) *Recorder {
	r := &Recorder{store: store{client: c, finalizer: v1alpha1.FinalizerRevoke, cache: informer, created: record.NewCreated()},
		informer: informer, seen: newSightings(informer)}
	for _, o := range opts {
		o(r)
	}
	return r
}

// Issuing creates e's record as its role is made, in one write: the
// object as created is the whole record of a credential being issued
// (the API server drops a status given at creation; the status is
// written by Issued, off the mint's path). Its spec names the lease, and
// the lease names the role, so a revocation after a crash needs nothing
// more.
func (r *Recorder) Issuing(ctx context.Context, e credential.Record) error {
	key := e.Pod.Namespace + "/" + Name(e.LeaseID)
	r.seen.expect(key) // before the create: its sighting may come before the answer
	_, made, err := r.create(ctx, e)
	if !made {
		r.seen.forget(key) // a record of an earlier try: the cache may hold it already
	}
	return err
}

// Issued records that e's role exists until e.ExpiresAt. It returns
// credential.ErrRecordGone when the record was deleted (the kill switch, the pod's
// deletion): the issuer must then not extend the role.
func (r *Recorder) Issued(ctx context.Context, e credential.Record) error {
	return r.setStatus(ctx, e, issued(e))
}

// Dropped lets the records of leaseID go: the issuer's finalizer is
// removed and the record deleted. A record whose deletion someone asked
// for while it was live (the kill switch, its pod's deletion) is left to
// the Controller, even when this drop came first (the node withdrew the
// volume and revoked): the Controller leaves the volume's tombstone before
// it lets the record go, and its revocation of a dropped role is a no-op.
func (r *Recorder) Dropped(ctx context.Context, leaseID string) error {
	creds, err := r.find(ctx, leaseID)
	if err != nil {
		return err
	}
	var errs []error
	for _, c := range creds {
		errs = append(errs, r.releaseLive(ctx, c.Namespace, c.Name))
	}
	return errors.Join(errs...)
}

// releaseLive releases a record that nobody asked to delete. Its first
// read may be the cache's (read): a deletion that landed since makes the
// update conflict, and every retry reads the API server.
func (r *Recorder) releaseLive(ctx context.Context, namespace, name string) error {
	deleting, first := false, true
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		c, err := r.record().Read(ctx, namespace, name, first)
		first = false
		if err != nil {
			return err
		}
		if deleting = c.DeletionTimestamp != nil; deleting || !slices.Contains(c.Finalizers, r.finalizer) {
			return nil
		}
		c.Finalizers = slices.DeleteFunc(c.Finalizers, func(f string) bool { return f == r.finalizer })
		_, err = r.client.Update(ctx, c)
		return err
	})
	if err == nil && !deleting {
		err = r.client.Delete(ctx, namespace, name, metav1.DeleteOptions{})
	}
	if err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("inventory: releasing %s/%s: %w", namespace, name, err)
	}
	return nil
}

// Tracked lists the lease IDs that have a record (a tombstone is none), from the informer's
// cache once it has synced (never from a cache not yet filled, which would
// make every role look untracked), else from the API server.
func (r *Recorder) Tracked(ctx context.Context) (map[string]bool, error) {
	out := map[string]bool{}
	if r.informer != nil && r.informer.HasSynced() {
		for _, obj := range r.informer.GetStore().List() {
			if c, ok := obj.(*v1alpha1.Credential); ok && !IsTombstone(c) {
				out[c.Spec.LeaseID] = true
			}
		}
		return out, nil
	}
	err := r.list(ctx, "", func(c *v1alpha1.Credential) {
		if !IsTombstone(c) {
			out[c.Spec.LeaseID] = true
		}
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// find is the records of leaseID (never a tombstone): from the cache, else (not synced yet,
// or not seen yet) from the API server.
func (r *Recorder) find(ctx context.Context, leaseID string) ([]*v1alpha1.Credential, error) {
	var out []*v1alpha1.Credential
	if r.informer != nil && r.informer.HasSynced() {
		objs, err := r.informer.GetIndexer().ByIndex(leaseIndex, leaseID)
		if err != nil {
			return nil, err
		}
		for _, obj := range objs {
			if c := obj.(*v1alpha1.Credential); !IsTombstone(c) {
				out = append(out, c)
			}
		}
		if len(out) > 0 {
			return out, nil
		}
	}
	sel := labels.Set{v1alpha1.LabelLeaseID: labelValue(leaseID)}.String()
	err := r.list(ctx, sel, func(c *v1alpha1.Credential) {
		if c.Spec.LeaseID == leaseID && !IsTombstone(c) {
			out = append(out, c.DeepCopy())
		}
	})
	return out, err
}

// list pages through the records of every namespace that match selector.
func (r *Recorder) list(ctx context.Context, selector string, each func(*v1alpha1.Credential)) error {
	return list(ctx, r.client, selector, each)
}
