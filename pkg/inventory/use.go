package inventory

import (
	"context"
	"errors"
	"fmt"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/klog/v2"

	v1alpha1 "github.com/ephemeral-secrets/csi-driver/pkg/apis/ephemeralsecrets/v1alpha1"
	"github.com/ephemeral-secrets/csi-driver/pkg/credential"
	"github.com/ephemeral-secrets/csi-driver/pkg/inventory/record"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// What the issuer saw of a credential's use, in the cluster (the
// issuer's optional issuer.UseRecorder; pkg/cli/allinone, which wires
// the two, checks it): the Recorder writes it into the credential's record (Used), warns its pod's
// people of a use from an address none expected (UsedElsewhere), and
// pulls the kill switch on such a use when the admin chose so (Withdraw).

// ReasonUsedElsewhere is the reason of the Warning event on a pod whose
// credential was used from an address none expected for it.
const ReasonUsedElsewhere = "CredentialUsedElsewhere"

// PodWarner sends a Warning event about a pod now, and tells whether the
// API server took it (events.Recorder's Send).
type PodWarner interface {
	Send(ctx context.Context, pod provider.Pod, reason, message string) error
}

// RecorderOption shapes a Recorder (NewRecorder).
type RecorderOption func(*Recorder)

// WithWarnings makes the Recorder send the Warning events of
// UsedElsewhere through w; without it UsedElsewhere fails.
func WithWarnings(w PodWarner) RecorderOption {
	return func(r *Recorder) { r.warner = w }
}

// Used writes u, what the issuer saw of the use of e's credential, into
// e's record: one status write (retried on conflict). A record being
// deleted is still written (the summary at revocation comes while its
// finalizer holds it); one that is gone, or records another lease, is
// credential.ErrRecordGone.
func (r *Recorder) Used(ctx context.Context, e credential.Record, u credential.Usage) error {
	err := r.updateStatus(ctx, e.Pod.Namespace, Name(e.LeaseID), func(c *v1alpha1.Credential) error {
		if c.Spec.LeaseID != e.LeaseID || IsTombstone(c) {
			return credential.ErrRecordGone
		}
		record.Used(u)(&c.Status)
		return nil
	})
	if apierrors.IsNotFound(err) {
		err = credential.ErrRecordGone
	}
	if err != nil {
		return fmt.Errorf("inventory: recording the use of lease %s: %w", e.LeaseID, err)
	}
	return nil
}

// UsedElsewhere sends the Warning event CredentialUsedElsewhere on e's
// pod: its Credential (by name) was used from addr, an address none
// expected, and what the issuer did (action: alert, revoke or record).
// The message holds no secret: the record's name, the role, the address.
func (r *Recorder) UsedElsewhere(ctx context.Context, e credential.Record, addr, action string) error {
	if r.warner == nil {
		return errors.New("inventory: no event sender: the Warning of a credential used elsewhere cannot be sent")
	}
	if err := r.warner.Send(ctx, e.Pod, ReasonUsedElsewhere, usedElsewhereMessage(e, addr, action)); err != nil {
		return fmt.Errorf("inventory: warning pod %s/%s of the use of lease %s from %s: %w", e.Pod.Namespace, e.Pod.Name, e.LeaseID, addr, err)
	}
	return nil
}

// usedElsewhereMessage is the message of a CredentialUsedElsewhere event.
func usedElsewhereMessage(e credential.Record, addr, action string) string {
	what := "Credential " + Name(e.LeaseID)
	if e.Role != "" {
		what += " (" + e.Role + ")"
	}
	msg := fmt.Sprintf("%s was used from %s, an address not expected for this pod (none of its IPs, its node's, or the networks the admin listed): ", what, addr)
	switch action {
	case "revoke":
		msg += "revoked (action revoke): its sessions are ended and this volume's credential withdrawn for the pod's life"
	case "alert":
		msg += "alerted (action alert): the credential still works; delete the Credential to revoke it"
	case "record":
		msg += "recorded (action record)"
	default:
		msg += "action " + action
	}
	return msg + ". The audit records with stage=use name the session; the Credential's status.sources lists its addresses."
}

// Withdraw deletes e's record while its pod lives: the kill switch, as
// a person's kubectl delete pulls it. The deletion has a UID
// precondition (the record read now, checked to be e's), so it never
// deletes another; the Controller then leaves the volume's tombstone
// (no new credential for it while the pod lives), revokes and lets the
// record go, and the node's watcher withdraws the volume's files. A
// record gone already is credential.ErrRecordGone; one being deleted
// already is no error.
func (r *Recorder) Withdraw(ctx context.Context, e credential.Record) error {
	name := Name(e.LeaseID)
	c, err := r.client.Get(ctx, e.Pod.Namespace, name)
	if err == nil && (c.Spec.LeaseID != e.LeaseID || c.Spec.Pod.UID != e.Pod.UID || IsTombstone(c)) {
		err = apierrors.NewNotFound(v1alpha1.SchemeGroupVersion.WithResource(v1alpha1.Resource).GroupResource(), name)
	}
	if err == nil && c.DeletionTimestamp != nil {
		return nil
	}
	if err == nil {
		uid := c.UID
		err = r.client.Delete(ctx, c.Namespace, c.Name, metav1.DeleteOptions{Preconditions: &metav1.Preconditions{UID: &uid}})
	}
	if apierrors.IsNotFound(err) || apierrors.IsConflict(err) {
		// Conflict: the UID differs, so the record read is gone.
		err = credential.ErrRecordGone
	}
	if err != nil {
		return fmt.Errorf("inventory: withdrawing lease %s: %w", e.LeaseID, err)
	}
	klog.InfoS("Withdrew a credential: its record is deleted (the kill switch)", "credential", klog.KRef(e.Pod.Namespace, name), "leaseID", e.LeaseID)
	return nil
}
