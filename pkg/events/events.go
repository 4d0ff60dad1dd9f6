// Package events tells a pod's owner why its volume could not be mounted:
// a Warning event on the pod, which "kubectl describe pod" shows. Messages
// carry the reason and the class, never a secret (the driver's errors
// never hold one).
package events

import (
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/record"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// Sink records a warning about a pod. A nil Sink records nothing.
type Sink interface {
	Warning(pod provider.Pod, reason, message string)
}

// Recorder sends events to the Kubernetes API in the background.
type Recorder struct {
	broadcaster record.EventBroadcaster
	recorder    record.EventRecorder
}

var _ Sink = (*Recorder)(nil)

// NewRecorder returns a Recorder reporting as component (the driver name)
// from node.
func NewRecorder(client kubernetes.Interface, component, node string) *Recorder {
	b := record.NewBroadcaster()
	b.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: client.CoreV1().Events("")})
	return &Recorder{broadcaster: b, recorder: b.NewRecorder(scheme.Scheme, corev1.EventSource{Component: component, Host: node})}
}

// Warning implements Sink.
func (r *Recorder) Warning(pod provider.Pod, reason, message string) {
	ref := &corev1.ObjectReference{
		APIVersion: "v1", Kind: "Pod", Namespace: pod.Namespace, Name: pod.Name, UID: types.UID(pod.UID),
	}
	r.recorder.Event(ref, corev1.EventTypeWarning, reason, message)
}

// Shutdown flushes and stops the broadcaster.
func (r *Recorder) Shutdown() { r.broadcaster.Shutdown() }
