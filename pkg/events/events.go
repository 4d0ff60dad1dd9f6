// Package events tells a pod's owner why its volume could not be mounted:
// a Warning event on the pod, which "kubectl describe pod" shows. Messages
// carry the reason and the class, never a secret (the driver's errors
// never hold one).
//
// Events are written with the dynamic client, as unstructured objects: the
// typed clientset and its scheme of every API group would double the
// driver's resident memory for one kind of object.
//
// It imports pkg/provider (the pod an event is about) only.
package events

import (
	"context"
	"sync"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/klog/v2"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// Sink records a warning about a pod.
type Sink interface {
	Warning(pod provider.Pod, reason, message string)
}

var eventsGVR = schema.GroupVersionResource{Version: "v1", Resource: "events"}

// Recorder sends events in the background, at most one per pod, reason and
// message every Interval, dropping what it cannot send: an event is
// advice, never worth slowing a publish.
type Recorder struct {
	client    dynamic.Interface
	component string
	node      string
	// Interval between two identical events (default 5 min).
	Interval time.Duration

	queue chan event
	mu    sync.Mutex
	sent  map[string]time.Time
}

type event struct {
	pod             provider.Pod
	reason, message string
	at              time.Time
}

var _ Sink = (*Recorder)(nil)

// NewRecorder returns a Recorder reporting as component from node; Run
// sends what it records.
func NewRecorder(client dynamic.Interface, component, node string) *Recorder {
	return &Recorder{client: client, component: component, node: node, Interval: 5 * time.Minute,
		queue: make(chan event, 256), sent: map[string]time.Time{}}
}

// Warning implements Sink.
func (r *Recorder) Warning(pod provider.Pod, reason, message string) {
	now := time.Now()
	key := pod.UID + "\x00" + reason + "\x00" + message
	r.mu.Lock()
	last, ok := r.sent[key]
	if ok && now.Sub(last) < r.Interval {
		r.mu.Unlock()
		return
	}
	r.sent[key] = now
	if len(r.sent) > 4096 { // forget old keys now and then
		for k, t := range r.sent {
			if now.Sub(t) >= r.Interval {
				delete(r.sent, k)
			}
		}
	}
	r.mu.Unlock()
	select {
	case r.queue <- event{pod: pod, reason: reason, message: message, at: now}:
	default:
		klog.V(2).InfoS("Event queue full; dropping an event", "pod", pod.Namespace+"/"+pod.Name, "reason", reason)
	}
}

// Run sends queued events until ctx is done.
func (r *Recorder) Run(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case e := <-r.queue:
			sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			if err := r.send(sctx, e); err != nil {
				klog.ErrorS(err, "Sending an event", "pod", e.pod.Namespace+"/"+e.pod.Name, "reason", e.reason)
			}
			cancel()
		}
	}
}

// Send sends a Warning event about pod now, neither queued nor
// deduplicated, and tells whether the API server took it: for a warning
// its caller must know was given (a credential used elsewhere), which
// the caller sends once.
func (r *Recorder) Send(ctx context.Context, pod provider.Pod, reason, message string) error {
	return r.send(ctx, event{pod: pod, reason: reason, message: message, at: time.Now()})
}

func (r *Recorder) send(ctx context.Context, e event) error {
	_, err := r.client.Resource(eventsGVR).Namespace(e.pod.Namespace).Create(ctx, r.object(e), metav1.CreateOptions{})
	return err
}

func (r *Recorder) object(e event) *unstructured.Unstructured {
	ts := e.at.UTC().Format(time.RFC3339)
	return &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "v1",
		"kind":       "Event",
		"metadata":   map[string]any{"generateName": e.pod.Name + ".", "namespace": e.pod.Namespace},
		"involvedObject": map[string]any{
			"apiVersion": "v1", "kind": "Pod", "namespace": e.pod.Namespace, "name": e.pod.Name, "uid": e.pod.UID,
		},
		"type":               "Warning",
		"reason":             e.reason,
		"message":            e.message,
		"source":             map[string]any{"component": r.component, "host": r.node},
		"reportingComponent": r.component,
		"reportingInstance":  r.node,
		"firstTimestamp":     ts,
		"lastTimestamp":      ts,
		"count":              int64(1),
	}}
}
