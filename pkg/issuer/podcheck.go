package issuer

import (
	"context"
	"crypto/sha256"
	"fmt"
	"strings"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	corev1client "k8s.io/client-go/kubernetes/typed/core/v1"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// DriverName is the CSI driver whose volumes name classes.
const DriverName = "ephemeral-secrets.csi.dev"

// classAttribute is the volume attribute that names a volume's class.
const classAttribute = "secretProviderClass"

// APIPodCheck is the PodCheck of the issuer Deployment without a cache:
// a fresh GET of the pod, that must exist with the UID given, be
// scheduled on the caller's node, run as the service account given, not
// have finished, and mount a volume of this driver naming the class
// (which is in the pod's namespace). With a volume ID, that volume must
// be the one kubelet gave the ID: a node cannot ask for more credentials
// than the pod has volumes.
func APIPodCheck(pods corev1client.PodsGetter) PodCheck { return CachedPodCheck(nil, pods) }

// CachedPodCheck is APIPodCheck that looks in cached (a PodCache; nil:
// nowhere) first: a pod the cache holds that passes every check is
// accepted without a request. Anything else (a pod not in the cache yet,
// or one the cache refuses: it may be behind) is asked of the API server
// with a GET, whose answer is final. So the cache never refuses, and
// what it accepts it has seen: the pod's UID, node, service account and
// volumes, which never change for a UID. Only that the pod still exists
// and has not finished may be a watch's delay old (milliseconds, or
// while the informer reconnects): a node may then be given a credential
// for a pod of its own that has just gone, which it held already; the
// record is owned by the pod, so the garbage collector's deletion of it
// revokes the credential, and the next extension checks the pod again.
func CachedPodCheck(cached PodLister, pods corev1client.PodsGetter) PodCheck {
	return func(ctx context.Context, c Caller, want provider.Pod, class, volumeID string) error {
		ns, name, ok := strings.Cut(class, "/")
		if !ok || ns != want.Namespace || name == "" {
			return fmt.Errorf("%w: class %q is not in the pod's namespace %q", provider.ErrPermissionDenied, class, want.Namespace)
		}
		if c.Node == "" {
			return fmt.Errorf("%w: the caller has no node", provider.ErrPermissionDenied)
		}
		if cached != nil {
			if pod, ok := cached.Pod(want.Namespace, want.Name); ok && checkPod(pod, c, want, name, volumeID) == nil {
				return nil
			}
		}
		pod, err := pods.Pods(want.Namespace).Get(ctx, want.Name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return fmt.Errorf("%w: pod %s/%s does not exist", provider.ErrPermissionDenied, want.Namespace, want.Name)
		}
		if err != nil {
			return fmt.Errorf("%w: reading pod %s/%s: %v", provider.ErrUnavailable, want.Namespace, want.Name, err)
		}
		return checkPod(pod, c, want, name, volumeID)
	}
}

func checkPod(pod *corev1.Pod, c Caller, want provider.Pod, class, volumeID string) error {
	deny := func(format string, args ...any) error {
		return fmt.Errorf("%w: pod %s/%s: %s", provider.ErrPermissionDenied, want.Namespace, want.Name, fmt.Sprintf(format, args...))
	}
	switch {
	case want.UID == "" || string(pod.UID) != want.UID:
		return deny("UID is not %q (the pod was replaced)", want.UID)
	case pod.Spec.NodeName != c.Node:
		return deny("is not scheduled on node %q", c.Node)
	case pod.Spec.ServiceAccountName != want.ServiceAccount:
		return deny("does not run as service account %q", want.ServiceAccount)
	case pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed:
		return deny("has finished (%s)", pod.Status.Phase)
	}
	for _, v := range pod.Spec.Volumes {
		if volumeID != "" && volumeHandle(pod.UID, v.Name) != volumeID {
			continue
		}
		if v.CSI != nil && v.CSI.Driver == DriverName && v.CSI.VolumeAttributes[classAttribute] == class {
			return nil
		}
	}
	if volumeID != "" {
		return deny("has no %s volume of class %q with volume ID %q", DriverName, class, volumeID)
	}
	return deny("mounts no %s volume of class %q", DriverName, class)
}

// volumeHandle is the volume ID kubelet gives an inline CSI volume
// (kubelet's makeVolumeHandle in pkg/volume/csi: "csi-" and the SHA-256
// of the pod's UID followed by the volume's name).
func volumeHandle(podUID types.UID, volume string) string {
	return fmt.Sprintf("csi-%x", sha256.Sum256([]byte(string(podUID)+volume)))
}
