package spc

import (
	"context"
	"errors"
	"fmt"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/tools/cache"
)

// GVR is the SecretProviderClass resource.
var GVR = schema.GroupVersionResource{Group: "secrets-store.csi.x-k8s.io", Version: "v1", Resource: "secretproviderclasses"}

// ErrNotSynced means the class cache has not been filled yet; the caller
// should retry.
var ErrNotSynced = errors.New("SecretProviderClass cache not synced yet")

// KubeResolver resolves classes from the cluster through an informer
// cache: a publish makes no API request, edits are seen as they happen,
// and only SecretProviderClass objects (without their managed fields) are
// held in memory.
type KubeResolver struct {
	informer cache.SharedIndexInformer
}

var _ Resolver = (*KubeResolver)(nil)

// NewKubeResolver prepares the cache; Start fills it.
//
// It builds its informer from the dynamic client's list and watch rather
// than through dynamicinformer, which links every typed informer of
// client-go (and doubles the driver's resident memory).
func NewKubeResolver(client dynamic.Interface, resync time.Duration) *KubeResolver {
	ri := client.Resource(GVR)
	lw := &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
			return ri.List(ctx, o)
		},
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			return ri.Watch(ctx, o)
		},
	}
	inf := cache.NewSharedIndexInformer(lw, &unstructured.Unstructured{}, resync, cache.Indexers{})
	_ = inf.SetTransform(func(obj any) (any, error) {
		if u, ok := obj.(*unstructured.Unstructured); ok {
			u.SetManagedFields(nil)
			u.SetAnnotations(nil) // kubectl's last-applied copy doubles every object
		}
		return obj, nil
	})
	return &KubeResolver{informer: inf}
}

// Start runs the informer until run is done and waits, at most until wait
// is done, for its first sync.
func (r *KubeResolver) Start(run, wait context.Context) error {
	go r.informer.Run(run.Done())
	if !cache.WaitForCacheSync(wait.Done(), r.informer.HasSynced) {
		return fmt.Errorf("%w: %v", ErrNotSynced, wait.Err())
	}
	return nil
}

// Resolve implements Resolver from the cache, in the pod's namespace only.
func (r *KubeResolver) Resolve(_ context.Context, namespace, name string) (*Class, error) {
	if !r.informer.HasSynced() {
		return nil, ErrNotSynced
	}
	obj, ok, err := r.informer.GetStore().GetByKey(namespace + "/" + name)
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, fmt.Errorf("%w: %s/%s", ErrClassNotFound, namespace, name)
	}
	u, ok := obj.(*unstructured.Unstructured)
	if !ok {
		return nil, fmt.Errorf("unexpected object %T in the class cache", obj)
	}
	return classFrom(u)
}

func classFrom(u *unstructured.Unstructured) (*Class, error) {
	prov, _, err := unstructured.NestedString(u.Object, "spec", "provider")
	if err != nil || prov == "" {
		return nil, fmt.Errorf("%w: class %s/%s has no spec.provider", ErrInvalidContext, u.GetNamespace(), u.GetName())
	}
	raw, _, err := unstructured.NestedMap(u.Object, "spec", "parameters")
	if err != nil {
		return nil, fmt.Errorf("%w: class %s/%s: spec.parameters: %v", ErrInvalidContext, u.GetNamespace(), u.GetName(), err)
	}
	if objs, _, _ := unstructured.NestedFieldNoCopy(u.Object, "spec", "secretObjects"); !isEmpty(objs) {
		return nil, refuseSecretObjects(u.GetNamespace(), u.GetName())
	}
	params := make(map[string]string, len(raw))
	for k, v := range raw {
		s, ok := v.(string)
		if !ok {
			return nil, fmt.Errorf("%w: class %s/%s: parameter %q is not a string", ErrInvalidContext, u.GetNamespace(), u.GetName(), k)
		}
		params[k] = s
	}
	return &Class{Namespace: u.GetNamespace(), Name: u.GetName(), Provider: prov, Parameters: params}, nil
}

// isEmpty reports whether a field is absent, null or an empty list.
func isEmpty(v any) bool {
	if v == nil {
		return true
	}
	l, ok := v.([]any)
	return ok && len(l) == 0
}
