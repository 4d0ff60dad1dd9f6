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
// leaves the cache), each kept as what the check reads (name, namespace,
// UID, node, service account, phase, and of its volumes only this
// driver's, with their class). It is a PodLister.
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
	// The store keeps podFacts: the informer needs of what it stores only
	// its metadata (the key, the resource version).
	_ = inf.SetTransform(trimPod)
	return &PodCache{inf: inf}
}

// Run fills the cache and keeps it current until ctx is done.
func (c *PodCache) Run(ctx context.Context) { c.inf.RunWithContext(ctx) }

// HasSynced tells whether the cache has been filled once.
func (c *PodCache) HasSynced() bool { return c.inf.HasSynced() }

// Pod is the pod namespace/name as the cache holds it: a Pod with only
// what checkPod reads.
func (c *PodCache) Pod(namespace, name string) (*corev1.Pod, bool) {
	if !c.inf.HasSynced() {
		return nil, false
	}
	obj, ok, err := c.inf.GetStore().GetByKey(namespace + "/" + name)
	if err != nil || !ok {
		return nil, false
	}
	f, ok := obj.(*podFacts)
	if !ok {
		return nil, false
	}
	return f.pod(), true
}

// podFacts is what the cache keeps of a pod (a quarter of a trimmed
// corev1.Pod, whose zero value alone is over a kilobyte): the object's
// name, namespace, UID and resource version (which the informer reads),
// and what checkPod reads.
type podFacts struct {
	metav1.ObjectMeta
	node, serviceAccount string
	phase                corev1.PodPhase
	volumes              []podVolume // this driver's
}

// podVolume is a volume of this driver: its name and class (hasClass:
// the volume has the class attribute, maybe empty).
type podVolume struct {
	name, class string
	hasClass    bool
}

// trimPod keeps of a pod its podFacts.
func trimPod(obj any) (any, error) {
	p, ok := obj.(*corev1.Pod)
	if !ok {
		return obj, nil // a deletion's last state unknown: the informer handles it
	}
	f := &podFacts{
		ObjectMeta: metav1.ObjectMeta{Name: p.Name, Namespace: p.Namespace, UID: p.UID, ResourceVersion: p.ResourceVersion},
		node:       p.Spec.NodeName, serviceAccount: p.Spec.ServiceAccountName, phase: p.Status.Phase,
	}
	for _, v := range p.Spec.Volumes {
		if v.CSI == nil || v.CSI.Driver != DriverName {
			continue
		}
		class, has := v.CSI.VolumeAttributes[classAttribute]
		f.volumes = append(f.volumes, podVolume{name: v.Name, class: class, hasClass: has})
	}
	return f, nil
}

// pod is f as a Pod (checkPod's input).
func (f *podFacts) pod() *corev1.Pod {
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: f.Name, Namespace: f.Namespace, UID: f.UID, ResourceVersion: f.ResourceVersion},
		Spec:       corev1.PodSpec{NodeName: f.node, ServiceAccountName: f.serviceAccount},
		Status:     corev1.PodStatus{Phase: f.phase},
	}
	for _, v := range f.volumes {
		csi := &corev1.CSIVolumeSource{Driver: DriverName}
		if v.hasClass {
			csi.VolumeAttributes = map[string]string{classAttribute: v.class}
		}
		p.Spec.Volumes = append(p.Spec.Volumes, corev1.Volume{Name: v.name, VolumeSource: corev1.VolumeSource{CSI: csi}})
	}
	return p
}
