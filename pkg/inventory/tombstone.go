package inventory

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/klog/v2"

	v1alpha1 "github.com/ephemeral-secrets/csi-driver/pkg/apis/ephemeralsecrets/v1alpha1"
	"github.com/ephemeral-secrets/csi-driver/pkg/credential"
	"github.com/ephemeral-secrets/csi-driver/pkg/inventory/record"
)

// A tombstone is the record that a pod's volume had its credential
// withdrawn: its Credential was deleted while the pod lived (the kill
// switch). It is a Credential in state Withdrawn, without a finalizer,
// owned by the Pod (the garbage collector deletes it with the pod), named
// for the pod's UID and the volume (one per volume, whatever its lease).
// The issuer refuses that volume a new credential (Recorder.Withdrawn)
// and the volume's node withdraws it on sight (NodeWatcher), so a kill
// holds although the node was down, or renewing, when it happened.

// TombstoneName is the name of the tombstone of a pod's volume. Its
// prefix has a dot, which no lease ID has, so it is never a record's name.
func TombstoneName(podUID, volumeID string) string {
	sum := sha256.Sum256([]byte(podUID + "\x00" + volumeID))
	return v1alpha1.TombstonePrefix + hex.EncodeToString(sum[:16])
}

// IsTombstone tells whether c is a tombstone rather than the record of a
// credential (record.IsTombstone).
var IsTombstone = record.IsTombstone

// tombstoneOf reports whether c is the tombstone of pod UID's volume.
func tombstoneOf(c *v1alpha1.Credential, podUID, volumeID string) bool {
	return IsTombstone(c) && c.Spec.Pod.UID == podUID && c.Spec.VolumeID == volumeID
}

// Withdrawn tells whether the credential of e's volume was withdrawn (it
// has a tombstone). e is the record of a mint this Recorder has just
// written (Issuing): a tombstone written before it is what refuses the
// mint (one written after it deletes it, leaveTombstone). Once the
// informer has delivered that record, its cache holds every tombstone
// written before it, and answers; else (no informer, a record of an
// earlier try, the cache more than seeWithin behind) the API server does.
func (r *Recorder) Withdrawn(ctx context.Context, e credential.Record) (bool, error) {
	seen := r.seen.seen(ctx, e.Pod.Namespace+"/"+Name(e.LeaseID))
	if e.VolumeID == "" || e.Pod.UID == "" {
		return false, nil
	}
	name := TombstoneName(e.Pod.UID, e.VolumeID)
	if seen {
		obj, ok, err := r.informer.GetIndexer().GetByKey(e.Pod.Namespace + "/" + name)
		if err == nil {
			c, isCred := obj.(*v1alpha1.Credential)
			return ok && isCred && tombstoneOf(c, e.Pod.UID, e.VolumeID), nil
		}
	}
	c, err := r.client.Get(ctx, e.Pod.Namespace, name)
	if apierrors.IsNotFound(err) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("inventory: reading the tombstone of volume %s: %w", e.VolumeID, err)
	}
	return tombstoneOf(c, e.Pod.UID, e.VolumeID), nil
}

// leaveTombstone writes the tombstone of the volume of cred, a record
// being deleted, unless its pod is gone (the garbage collector or the
// pod check deleted it: nothing is left to protect). When the pod cannot
// be read it writes one anyway: the garbage collector removes a tombstone
// whose pod is gone, and a kill must not be undone by an API error.
func (c *Controller) leaveTombstone(ctx context.Context, cred *v1alpha1.Credential) error {
	if cred.Spec.VolumeID == "" {
		return nil // a record of an issuer that did not know the volume
	}
	pod, err := c.pods.Pods(cred.Namespace).Get(ctx, cred.Spec.Pod.Name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err), err == nil && string(pod.UID) != cred.Spec.Pod.UID:
		return nil
	case err != nil:
		klog.ErrorS(err, "Reading the pod of a deleted credential record; leaving a tombstone anyway", "credential", klog.KObj(cred))
	}
	name := TombstoneName(cred.Spec.Pod.UID, cred.Spec.VolumeID)
	t, err := c.client.Get(ctx, cred.Namespace, name)
	if apierrors.IsNotFound(err) {
		t, err = c.client.Create(ctx, newTombstone(cred, name))
		if apierrors.IsAlreadyExists(err) {
			t, err = c.client.Get(ctx, cred.Namespace, name)
		}
		if apierrors.HasStatusCause(err, corev1.NamespaceTerminatingCause) {
			return nil // the pod goes with its namespace
		}
	}
	if err != nil {
		return fmt.Errorf("writing the tombstone of %s/%s: %w", cred.Namespace, cred.Name, err)
	}
	if t.Spec.Pod.UID != cred.Spec.Pod.UID || t.Spec.VolumeID != cred.Spec.VolumeID {
		// Not ours (only the issuer writes this name: a policy keeps it
		// so): delete it, the retry writes the right one.
		uid := t.UID
		_ = c.client.Delete(ctx, t.Namespace, t.Name, metav1.DeleteOptions{Preconditions: &metav1.Preconditions{UID: &uid}})
		return fmt.Errorf("the tombstone %s/%s names another pod or volume: deleted it", t.Namespace, t.Name)
	}
	if t.Status.State != v1alpha1.StateWithdrawn {
		if err := c.markWithdrawn(ctx, t, cred); err != nil {
			return err
		}
	}
	return c.deleteSiblings(ctx, cred)
}

// markWithdrawn makes t the tombstone of cred's volume (its status).
func (c *Controller) markWithdrawn(ctx context.Context, t, cred *v1alpha1.Credential) error {
	msg := fmt.Sprintf("the credential of this volume was withdrawn by deleting its Credential record %s (lease %s) at %s",
		cred.Name, cred.Spec.LeaseID, cred.DeletionTimestamp.UTC().Format(time.RFC3339))
	t.Status.State = v1alpha1.StateWithdrawn
	meta.SetStatusCondition(&t.Status.Conditions, metav1.Condition{
		Type: v1alpha1.ConditionWithdrawn, Status: metav1.ConditionTrue, Reason: "RecordDeleted", Message: msg,
	})
	if _, err := c.client.UpdateStatus(ctx, t); err != nil {
		return fmt.Errorf("writing the tombstone of %s/%s: %w", cred.Namespace, cred.Name, err)
	}
	klog.InfoS("Left a tombstone: the volume is not issued a credential again while its pod lives",
		"credential", klog.KObj(cred), "tombstone", t.Name, "volumeID", cred.Spec.VolumeID)
	return nil
}

// deleteSiblings deletes the other live records of cred's volume (a
// rotation's new lease minted as the kill happened), read from the API
// server after the tombstone was written: a record this misses was
// written after the tombstone, so its mint saw the tombstone and refused.
// Their deletion revokes them.
func (c *Controller) deleteSiblings(ctx context.Context, cred *v1alpha1.Credential) error {
	sel := labels.Set{v1alpha1.LabelPodUID: labelValue(cred.Spec.Pod.UID)}.String()
	l, err := c.client.List(ctx, cred.Namespace, metav1.ListOptions{LabelSelector: sel})
	if err != nil {
		return fmt.Errorf("listing the records of the volume of %s/%s: %w", cred.Namespace, cred.Name, err)
	}
	for i := range l.Items {
		s := &l.Items[i]
		if s.UID == cred.UID || IsTombstone(s) || s.DeletionTimestamp != nil ||
			s.Spec.Pod.UID != cred.Spec.Pod.UID || s.Spec.VolumeID != cred.Spec.VolumeID {
			continue
		}
		uid := s.UID
		err := c.client.Delete(ctx, s.Namespace, s.Name, metav1.DeleteOptions{Preconditions: &metav1.Preconditions{UID: &uid}})
		if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
			return fmt.Errorf("deleting %s/%s, another record of a withdrawn volume: %w", s.Namespace, s.Name, err)
		}
		klog.InfoS("Deleted another record of a withdrawn volume", "credential", klog.KObj(s), "volumeID", s.Spec.VolumeID)
	}
	return nil
}

// newTombstone is the tombstone of cred's volume (its status is written
// after): cred's spec and owner, its node's and pod's labels (the node's
// watcher selects it), no lease label (a lease's records are not it), no
// finalizer.
func newTombstone(cred *v1alpha1.Credential, name string) *v1alpha1.Credential {
	t := &v1alpha1.Credential{
		ObjectMeta: metav1.ObjectMeta{
			Name: name, Namespace: cred.Namespace,
			Labels: map[string]string{
				v1alpha1.LabelNode:     labelValue(cred.Spec.Node),
				v1alpha1.LabelProvider: labelValue(cred.Spec.Provider),
				v1alpha1.LabelPodUID:   labelValue(cred.Spec.Pod.UID),
			},
			OwnerReferences: []metav1.OwnerReference{podOwner(cred.Spec.Pod)},
		},
		Spec: cred.Spec,
	}
	return t
}
