package inventory

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	storagev1 "k8s.io/api/storage/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes"
	corev1client "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/pager"
	"k8s.io/client-go/util/retry"
	"k8s.io/klog/v2"

	v1alpha1 "github.com/ephemeral-secrets/csi-driver/pkg/apis/ephemeralsecrets/v1alpha1"
)

// Holders tells the housekeeper whether the holders of records are there.
type Holders interface {
	// IssuerPresent tells whether the issuer has a leader now.
	IssuerPresent(ctx context.Context) (bool, error)
	// NodePluginPresent tells whether the driver's node plugin is
	// registered with the kubelet of node.
	NodePluginPresent(ctx context.Context, node string) (bool, error)
}

// NewHousekeeper is the Controller that keeps the inventory without the
// issuer, whatever the install's profile: it deletes the record of a pod
// that is gone, lets a node's record go once its credential expired, and
// hands over a record being deleted whose holder is gone (holders). It
// revokes nothing and holds no backend credential: one always-on pod
// does it for the cluster, so that the node plugins stay lean and a node
// that is gone is covered too.
func NewHousekeeper(c *Client, informer cache.SharedIndexInformer, pods corev1client.PodsGetter, holders Holders, opts ControllerOptions) *Controller {
	opts.Holders, opts.RevokeOnly = holders, false
	return NewController(c, informer, pods, nil, opts)
}

// ClusterHolders answers Holders from the API: the issuer's leader Lease,
// and each node's Node and CSINode objects.
type ClusterHolders struct {
	Client kubernetes.Interface
	// IssuerLease is the issuer's leader election Lease (namespace and
	// name); no name: there is no issuer.
	IssuerLeaseNamespace, IssuerLeaseName string
	// Driver is the CSI driver's name in CSINode.
	Driver string
	// Now is the clock (default time.Now).
	Now func() time.Time
}

var _ Holders = ClusterHolders{}

// IssuerPresent: the Lease exists, names a holder, and was renewed within
// its duration.
func (h ClusterHolders) IssuerPresent(ctx context.Context) (bool, error) {
	if h.IssuerLeaseName == "" {
		return false, nil
	}
	l, err := h.Client.CoordinationV1().Leases(h.IssuerLeaseNamespace).Get(ctx, h.IssuerLeaseName, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	s := l.Spec
	if s.HolderIdentity == nil || *s.HolderIdentity == "" || s.RenewTime == nil || s.LeaseDurationSeconds == nil {
		return false, nil
	}
	now := time.Now
	if h.Now != nil {
		now = h.Now
	}
	return now().Before(s.RenewTime.Add(time.Duration(*s.LeaseDurationSeconds) * time.Second)), nil
}

// NodePluginPresent: the Node exists and its CSINode lists the driver
// (kubelet removes it when the plugin deregisters: the DaemonSet's pod
// is gone from the node). A node that is down keeps its entry: its
// plugin may come back and revoke.
func (h ClusterHolders) NodePluginPresent(ctx context.Context, node string) (bool, error) {
	if _, err := h.Client.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{}); apierrors.IsNotFound(err) {
		return false, nil
	} else if err != nil {
		return false, err
	}
	cn, err := h.Client.StorageV1().CSINodes().Get(ctx, node, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	return slices.ContainsFunc(cn.Spec.Drivers, func(d storagev1.CSINodeDriver) bool { return d.Name == h.Driver }), nil
}

// HandOverAll removes every finalizer of the driver from every record of
// the cluster and records why on each (the Revoked condition, reason
// HandedOver): what the uninstall does once no pod mounts the driver's
// volumes, so that no record, and no namespace, waits for a node plugin
// or an issuer that is gone. Each credential still live at its backend
// ends at its expiry. It returns how many records it let go.
func HandOverAll(ctx context.Context, c *Client, why string) (int, error) {
	n := 0
	var errs []error
	err := list(ctx, c, "", func(cred *v1alpha1.Credential) {
		if !slices.Contains(cred.Finalizers, v1alpha1.FinalizerRevoke) && !slices.Contains(cred.Finalizers, v1alpha1.FinalizerNodeRevoke) {
			return
		}
		if err := handOverOne(ctx, c, cred.Namespace, cred.Name, why); err != nil {
			errs = append(errs, err)
			return
		}
		n++
		klog.InfoS("Handed over a credential record", "credential", klog.KObj(cred), "provider", cred.Spec.Provider,
			"expiresAt", cred.Status.ExpiresAt, "why", why)
	})
	return n, errors.Join(append(errs, err)...)
}

// handOverOne writes why on a record, then removes the driver's finalizers.
func handOverOne(ctx context.Context, c *Client, namespace, name, why string) error {
	s := store{client: c}
	err := s.updateStatus(ctx, namespace, name, func(cred *v1alpha1.Credential) error {
		msg := why + ": the record goes without its revocation"
		if cred.Status.ExpiresAt != nil {
			msg += "; the backend ends the credential at " + cred.Status.ExpiresAt.UTC().Format(time.RFC3339)
		}
		meta.SetStatusCondition(&cred.Status.Conditions, metav1.Condition{
			Type: v1alpha1.ConditionRevoked, Status: metav1.ConditionFalse, Reason: ReasonHandedOver, Message: msg,
		})
		return nil
	})
	if err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("inventory: %s/%s: %w", namespace, name, err)
	}
	err = retry.RetryOnConflict(retry.DefaultRetry, func() error {
		cred, err := c.Get(ctx, namespace, name)
		if err != nil {
			return err
		}
		kept := slices.DeleteFunc(slices.Clone(cred.Finalizers), func(f string) bool {
			return f == v1alpha1.FinalizerRevoke || f == v1alpha1.FinalizerNodeRevoke
		})
		if len(kept) == len(cred.Finalizers) {
			return nil
		}
		cred.Finalizers = kept
		_, err = c.Update(ctx, cred)
		return err
	})
	if err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("inventory: releasing %s/%s: %w", namespace, name, err)
	}
	return nil
}

// list pages through the records of every namespace that match selector.
func list(ctx context.Context, c *Client, selector string, each func(*v1alpha1.Credential)) error {
	p := pager.New(func(ctx context.Context, opts metav1.ListOptions) (runtime.Object, error) {
		return c.List(ctx, metav1.NamespaceAll, opts)
	})
	err := p.EachListItem(ctx, metav1.ListOptions{LabelSelector: selector}, func(o runtime.Object) error {
		each(o.(*v1alpha1.Credential))
		return nil
	})
	if err != nil {
		return fmt.Errorf("inventory: listing credentials: %w", err)
	}
	return nil
}

// Held counts the records that a finalizer of the driver still holds.
func Held(ctx context.Context, c *Client) (int, error) {
	n := 0
	err := list(ctx, c, "", func(cred *v1alpha1.Credential) {
		if slices.Contains(cred.Finalizers, v1alpha1.FinalizerRevoke) || slices.Contains(cred.Finalizers, v1alpha1.FinalizerNodeRevoke) {
			n++
		}
	})
	return n, err
}
