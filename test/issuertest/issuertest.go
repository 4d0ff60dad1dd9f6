// Package issuertest makes, in a real kube-apiserver, what the cluster
// issuer checks: Nodes, the driver's service account with a pod on each
// node and a bound token of that pod (whose review names the node), and
// tenant pods that mount a volume of the driver naming a class.
package issuertest

import (
	"context"
	"crypto/sha256"
	"fmt"
	"os"
	"path/filepath"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/test/harness"
)

// The driver's identity in the test cluster.
const (
	DriverNamespace      = "esc-system"
	DriverServiceAccount = "ephemeral-secrets-csi"
)

// Cluster makes objects with an admin client.
type Cluster struct {
	CS *kubernetes.Clientset
}

func (c Cluster) ensure(err error) error {
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return err
	}
	return nil
}

// Namespace makes a namespace and a service account in it.
func (c Cluster) Namespace(ctx context.Context, ns, sa string) error {
	_, err := c.CS.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
	if err := c.ensure(err); err != nil {
		return err
	}
	_, err = c.CS.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa}}, metav1.CreateOptions{})
	return c.ensure(err)
}

// Node makes a Node object and the driver's pod on it, and returns the
// driver pod.
func (c Cluster) Node(ctx context.Context, node string) (*corev1.Pod, error) {
	_, err := c.CS.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: node}}, metav1.CreateOptions{})
	if err := c.ensure(err); err != nil {
		return nil, err
	}
	if err := c.Namespace(ctx, DriverNamespace, DriverServiceAccount); err != nil {
		return nil, err
	}
	p, err := c.pod(ctx, DriverNamespace, "driver-"+node, DriverServiceAccount, node, nil)
	if apierrors.IsAlreadyExists(err) {
		return c.CS.CoreV1().Pods(DriverNamespace).Get(ctx, "driver-"+node, metav1.GetOptions{})
	}
	return p, err
}

// VolumeName is the name of the driver volume of tenant pods.
const VolumeName = "db"

// TenantPod makes a pod of sa on node that mounts a volume of the driver
// naming class, and returns the identity kubelet would report and the
// volume ID kubelet gives the volume.
func (c Cluster) TenantPod(ctx context.Context, ns, name, sa, node, class string) (provider.Pod, string, error) {
	if err := c.Namespace(ctx, ns, sa); err != nil {
		return provider.Pod{}, "", err
	}
	vols := []corev1.Volume{{Name: VolumeName, VolumeSource: corev1.VolumeSource{CSI: &corev1.CSIVolumeSource{
		Driver: "ephemeral-secrets.csi.dev", ReadOnly: ptr(true),
		VolumeAttributes: map[string]string{"secretProviderClass": class},
	}}}}
	p, err := c.pod(ctx, ns, name, sa, node, vols)
	if err != nil {
		return provider.Pod{}, "", err
	}
	return provider.Pod{Namespace: ns, Name: name, UID: string(p.UID), ServiceAccount: sa}, VolumeID(string(p.UID), VolumeName), nil
}

// VolumeID is the ID kubelet gives an inline CSI volume.
func VolumeID(podUID, volume string) string {
	return fmt.Sprintf("csi-%x", sha256.Sum256([]byte(podUID+volume)))
}

func (c Cluster) pod(ctx context.Context, ns, name, sa, node string, vols []corev1.Volume) (*corev1.Pod, error) {
	return c.CS.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: corev1.PodSpec{ServiceAccountName: sa, NodeName: node, Volumes: vols,
			AutomountServiceAccountToken: ptr(false),
			Containers:                   []corev1.Container{{Name: "app", Image: "busybox"}}},
	}, metav1.CreateOptions{})
}

// Token is a token of pod's service account bound to pod (so that its
// review names pod's node), for audience; remembered as a secret for the
// log checks.
func (c Cluster) Token(ctx context.Context, pod *corev1.Pod, audience string) (string, error) {
	tr, err := c.CS.CoreV1().ServiceAccounts(pod.Namespace).CreateToken(ctx, pod.Spec.ServiceAccountName, &authenticationv1.TokenRequest{
		Spec: authenticationv1.TokenRequestSpec{
			Audiences:         []string{audience},
			ExpirationSeconds: ptr(int64(3600)),
			BoundObjectRef:    &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		return "", err
	}
	harness.RememberSecret(tr.Status.Token)
	return tr.Status.Token, nil
}

// PodToken is Token for the pod ns/name.
func (c Cluster) PodToken(ctx context.Context, ns, name, audience string) (string, error) {
	pod, err := c.CS.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return "", err
	}
	return c.Token(ctx, pod, audience)
}

// UnboundToken is a token of ns/sa bound to no pod (its review names no
// node).
func (c Cluster) UnboundToken(ctx context.Context, ns, sa, audience string) (string, error) {
	tr, err := c.CS.CoreV1().ServiceAccounts(ns).CreateToken(ctx, sa, &authenticationv1.TokenRequest{
		Spec: authenticationv1.TokenRequestSpec{Audiences: []string{audience}},
	}, metav1.CreateOptions{})
	if err != nil {
		return "", err
	}
	harness.RememberSecret(tr.Status.Token)
	return tr.Status.Token, nil
}

// WriteToken writes token to a file in dir, as kubelet projects it.
func WriteToken(dir, name, token string) (string, error) {
	path := filepath.Join(dir, name)
	return path, os.WriteFile(path, []byte(token), 0o600)
}

func ptr[T any](v T) *T { return &v }
