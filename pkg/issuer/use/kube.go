package use

import (
	"context"
	"fmt"
	"net/netip"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	corev1client "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/klog/v2"

	"github.com/ephemeral-secrets/csi-driver/pkg/credential"
)

// KubeResolver is the Resolver of a cluster: a credential's sessions are
// expected from its pod's IPs (status.podIPs) and from its node's
// addresses (status.addresses: a cluster that SNATs pod traffic to a
// database outside it). It reads both afresh (two GETs; the tracker asks
// once per credential). A pod that is gone, or is another of that name
// (its UID differs), has no address: only the connection's networks are
// then expected.
type KubeResolver struct {
	Pods  corev1client.PodsGetter
	Nodes corev1client.NodesGetter
}

var _ Resolver = KubeResolver{}

// Expected implements Resolver.
func (k KubeResolver) Expected(ctx context.Context, e credential.Record) ([]netip.Addr, error) {
	pod, err := k.Pods.Pods(e.Pod.Namespace).Get(ctx, e.Pod.Name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading pod %s/%s: %w", e.Pod.Namespace, e.Pod.Name, err)
	}
	if e.Pod.UID != "" && string(pod.UID) != e.Pod.UID {
		return nil, nil
	}
	var out []netip.Addr
	for _, ip := range pod.Status.PodIPs {
		if a, err := netip.ParseAddr(ip.IP); err == nil {
			out = append(out, a.Unmap())
		}
	}
	// A pod's IPs come after its volumes (and its credential): a running
	// pod that uses its own network has them soon.
	noIP := len(out) == 0 && !pod.Spec.HostNetwork && pod.Status.Phase != corev1.PodSucceeded && pod.Status.Phase != corev1.PodFailed
	out, err = k.node(ctx, pod, e, out)
	if err == nil && noIP {
		err = fmt.Errorf("pod %s/%s: %w", e.Pod.Namespace, e.Pod.Name, ErrNoPodAddress)
	}
	return out, err
}

// node adds the addresses of pod's node to out.
func (k KubeResolver) node(ctx context.Context, pod *corev1.Pod, e credential.Record, out []netip.Addr) ([]netip.Addr, error) {
	nodeName := pod.Spec.NodeName
	if nodeName == "" {
		nodeName = e.Node
	}
	if nodeName == "" {
		return out, nil
	}
	node, err := k.Nodes.Nodes().Get(ctx, nodeName, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return out, nil
	}
	if apierrors.IsForbidden(err) {
		// An issuer not allowed to read nodes (its RBAC older than this
		// code) expects the pod's IPs only: a cluster that SNATs pod
		// traffic then sees its pods' uses as foreign.
		klog.V(2).InfoS("Not allowed to read the node: only the pod's IPs are expected", "node", nodeName)
		return out, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading node %s: %w", nodeName, err)
	}
	for _, na := range node.Status.Addresses {
		if na.Type != corev1.NodeInternalIP && na.Type != corev1.NodeExternalIP {
			continue
		}
		if a, err := netip.ParseAddr(na.Address); err == nil {
			out = append(out, a.Unmap())
		}
	}
	return out, nil
}
