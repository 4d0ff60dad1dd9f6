package record

import (
	"context"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/tools/cache"

	v1alpha1 "github.com/ephemeral-secrets/csi-driver/pkg/apis/ephemeralsecrets/v1alpha1"
)

// LeaseIndex indexes a cache of Credentials by spec.leaseID.
const LeaseIndex = "leaseID"

// NewInformer is a shared informer of the Credentials whose labels match
// selector ("": all of them), in every namespace, indexed by lease ID.
// The issuer shares one between its Recorder and its Controller; a node
// plugin's NodeWatcher makes its own, of its node's records only.
func NewInformer(c *Client, selector string, resync time.Duration) cache.SharedIndexInformer {
	lw := &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
			o.LabelSelector = selector
			return c.List(ctx, metav1.NamespaceAll, o)
		},
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			o.LabelSelector = selector
			return c.Watch(ctx, metav1.NamespaceAll, o)
		},
	}
	inf := cache.NewSharedIndexInformer(lw, &v1alpha1.Credential{}, resync, cache.Indexers{
		cache.NamespaceIndex: cache.MetaNamespaceIndexFunc,
		LeaseIndex: func(obj any) ([]string, error) {
			if c, ok := obj.(*v1alpha1.Credential); ok {
				return []string{c.Spec.LeaseID}, nil
			}
			return nil, nil
		},
	})
	_ = inf.SetTransform(func(obj any) (any, error) {
		if c, ok := obj.(*v1alpha1.Credential); ok {
			c.ManagedFields = nil
		}
		return obj, nil
	})
	return inf
}
