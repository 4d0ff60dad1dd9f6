package issuer

import (
	"context"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	corev1client "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/cache"
)

// PodLister gives a pod as a cache last saw it (false: not there, or the
// cache has not synced).
type PodLister interface {
	Pod(namespace, name string) (*corev1.Pod, bool)
}

// PodCache is an informer of the pods a pod check may accept: scheduled
// on a node and not finished (a field selector: a pod that finishes
// leaves the cache), each kept trimmed to what the check reads (name,
// namespace, UID, node, service account, phase, and of its volumes only
// this driver's, with their class). It is a PodLister.
type PodCache struct {
	inf cache.SharedIndexInformer
}

var _ PodLister = (*PodCache)(nil)

// podCacheSelector selects the pods PodCache holds.
const podCacheSelector = "spec.nodeName!=,status.phase!=Succeeded,status.phase!=Failed"

// NewPodCache watches the pods of every namespace with pods (a client
// with list and watch on pods). Run fills it.
func NewPodCache(pods corev1client.PodsGetter) *PodCache {
	lw := &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
			o.FieldSelector = podCacheSelector
			return pods.Pods(metav1.NamespaceAll).List(ctx, o)
		},
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			o.FieldSelector = podCacheSelector
			return pods.Pods(metav1.NamespaceAll).Watch(ctx, o)
		},
	}
	inf := cache.NewSharedIndexInformer(lw, &corev1.Pod{}, 0, cache.Indexers{})
	_ = inf.SetTransform(trimPod)
	return &PodCache{inf: inf}
}

// Run fills the cache and keeps it current until ctx is done.
func (c *PodCache) Run(ctx context.Context) { c.inf.RunWithContext(ctx) }

// HasSynced tells whether the cache has been filled once.
func (c *PodCache) HasSynced() bool { return c.inf.HasSynced() }

// Pod is the pod namespace/name as the cache holds it (trimmed: read
// only what checkPod reads; never change it).
func (c *PodCache) Pod(namespace, name string) (*corev1.Pod, bool) {
	if !c.inf.HasSynced() {
		return nil, false
	}
	obj, ok, err := c.inf.GetStore().GetByKey(namespace + "/" + name)
	if err != nil || !ok {
		return nil, false
	}
	p, ok := obj.(*corev1.Pod)
	return p, ok
}

// trimPod keeps of a pod what checkPod reads, and what the informer
// needs (its resource version): a few hundred bytes a pod instead of
// kilobytes.
func trimPod(obj any) (any, error) {
	p, ok := obj.(*corev1.Pod)
	if !ok {
		return obj, nil // a deletion's last state unknown: the informer handles it
	}
	t := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: p.Name, Namespace: p.Namespace, UID: p.UID, ResourceVersion: p.ResourceVersion},
		Spec:       corev1.PodSpec{NodeName: p.Spec.NodeName, ServiceAccountName: p.Spec.ServiceAccountName},
		Status:     corev1.PodStatus{Phase: p.Status.Phase},
	}
	for _, v := range p.Spec.Volumes {
		if v.CSI == nil || v.CSI.Driver != DriverName {
			continue
		}
		csi := &corev1.CSIVolumeSource{Driver: DriverName}
		if class, ok := v.CSI.VolumeAttributes[classAttribute]; ok {
			csi.VolumeAttributes = map[string]string{classAttribute: class}
		}
		t.Spec.Volumes = append(t.Spec.Volumes, corev1.Volume{Name: v.Name, VolumeSource: corev1.VolumeSource{CSI: csi}})
	}
	return t, nil
}
