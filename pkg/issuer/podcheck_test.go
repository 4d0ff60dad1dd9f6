package issuer_test

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	corev1client "k8s.io/client-go/kubernetes/typed/core/v1"

	"github.com/ephemeral-secrets/csi-driver/pkg/issuer"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/issuertest"
	"github.com/ephemeral-secrets/csi-driver/test/kube"
)

// apiServer starts a kube-apiserver (stopped when t ends) and returns its
// admin client.
func apiServer(t *testing.T) (*kube.Cluster, *kubernetes.Clientset, issuertest.Cluster) {
	t.Helper()
	if testing.Short() {
		t.Skip("starts a kube-apiserver")
	}
	c, err := kube.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Stop)
	cs, err := kubernetes.NewForConfig(c.Config())
	if err != nil {
		t.Fatal(err)
	}
	return c, cs, issuertest.Cluster{CS: cs}
}

// APIPodCheck against a real API server: only a pod of that UID, on the
// caller's node, of that service account, with a volume of the class
// (that volume when its ID is given) passes.
func TestAPIPodCheck(t *testing.T) {
	c, cs, objs := apiServer(t)
	ctx := context.Background()
	pod, vol, err := objs.TenantPod(ctx, "shop", "orders", "orders-sa", "node-a", "orders-db")
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := objs.TenantPod(ctx, "shop", "other", "orders-sa", "node-a", "other-db"); err != nil {
		t.Fatal(err)
	}
	done, _, err := objs.TenantPod(ctx, "shop", "done", "orders-sa", "node-a", "orders-db")
	if err != nil {
		t.Fatal(err)
	}
	p, err := cs.CoreV1().Pods("shop").Get(ctx, "done", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	p.Status.Phase = "Succeeded"
	if _, err := cs.CoreV1().Pods("shop").UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	// The cached check over a cache that holds every pod (the finished
	// one left it), and the check without a cache: the same answers.
	pc := issuer.NewPodCache(cs.CoreV1())
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go pc.Run(cctx)
	harness.Eventually(t, 10*time.Second, "the cache of pods", func() (bool, error) {
		_, orders := pc.Pod("shop", "orders")
		_, other := pc.Pod("shop", "other")
		_, done := pc.Pod("shop", "done")
		return orders && other && !done, nil
	})
	gets := &countingPods{PodsGetter: cs.CoreV1()}
	checks := map[string]issuer.PodCheck{"fresh": issuer.APIPodCheck(cs.CoreV1()), "cached": issuer.CachedPodCheck(pc, gets)}
	nodeA := issuer.Caller{Node: "node-a"}
	with := func(f func(*provider.Pod)) provider.Pod { q := pod; f(&q); return q }
	for _, tc := range []struct {
		name   string
		caller issuer.Caller
		pod    provider.Pod
		class  string
		volume string
		ok     bool
	}{
		{"the pod, its volume", nodeA, pod, "shop/orders-db", vol, true},
		{"the pod, without a volume ID", nodeA, pod, "shop/orders-db", "", true},
		{"another node", issuer.Caller{Node: "node-b"}, pod, "shop/orders-db", vol, false},
		{"no node", issuer.Caller{}, pod, "shop/orders-db", vol, false},
		{"another UID", nodeA, with(func(p *provider.Pod) { p.UID = "0000" }), "shop/orders-db", vol, false},
		{"another service account", nodeA, with(func(p *provider.Pod) { p.ServiceAccount = "default" }), "shop/orders-db", vol, false},
		{"a class the pod does not mount", nodeA, pod, "shop/other-db", "", false},
		{"a class of another namespace", nodeA, pod, "bank/orders-db", "", false},
		{"a volume ID the pod does not have", nodeA, pod, "shop/orders-db", issuertest.VolumeID(pod.UID, "extra"), false},
		{"a pod that does not exist", nodeA, with(func(p *provider.Pod) { p.Name = "ghost" }), "shop/orders-db", vol, false},
		{"a finished pod", nodeA, done, "shop/orders-db", "", false},
	} {
		for kind, check := range checks {
			t.Run(kind+"/"+tc.name, func(t *testing.T) {
				before := gets.n.Load()
				err := check(ctx, tc.caller, tc.pod, tc.class, tc.volume)
				if tc.ok && err != nil {
					t.Fatalf("refused: %v", err)
				}
				if !tc.ok && !errors.Is(err, provider.ErrPermissionDenied) {
					t.Fatalf("err = %v, want PermissionDenied", err)
				}
				// What the cache accepts needs no request; what it refuses
				// is asked of the API server (the cache may be behind).
				if n := gets.n.Load() - before; kind == "cached" && tc.ok && n != 0 {
					t.Errorf("%d GETs for a pod the cache holds", n)
				}
			})
		}
	}
	if gets.n.Load() == 0 {
		t.Error("the cached check never asked the API server, even to refuse")
	}
	// An API server it cannot reach: Unavailable, not denied (and a pod the
	// cache holds still passes).
	c.Stop()
	if err := checks["fresh"](ctx, nodeA, pod, "shop/orders-db", vol); !errors.Is(err, provider.ErrUnavailable) {
		t.Errorf("err = %v, want Unavailable", err)
	}
	if err := checks["cached"](ctx, nodeA, pod, "shop/orders-db", vol); err != nil {
		t.Errorf("cached, the API server gone: %v", err)
	}
}

// countingPods counts the GETs of pods.
type countingPods struct {
	corev1client.PodsGetter
	n atomic.Int64
}

func (c *countingPods) Pods(ns string) corev1client.PodInterface {
	return countingPodInterface{c.PodsGetter.Pods(ns), &c.n}
}

type countingPodInterface struct {
	corev1client.PodInterface
	n *atomic.Int64
}

func (c countingPodInterface) Get(ctx context.Context, name string, o metav1.GetOptions) (*corev1.Pod, error) {
	c.n.Add(1)
	return c.PodInterface.Get(ctx, name, o)
}

// stalePods is a cache that holds what it was given, whatever the API
// server says now.
type stalePods map[string]*corev1.Pod

func (s stalePods) Pod(ns, name string) (*corev1.Pod, bool) { p, ok := s[ns+"/"+name]; return p, ok }

// TestCachedPodCheckAsksWhatTheCacheDoesNotKnow: a pod the cache has not
// seen yet, or holds as it was before it was replaced (another UID), is
// checked with a GET; the cache keeps of a pod only what the check reads.
func TestCachedPodCheckAsksWhatTheCacheDoesNotKnow(t *testing.T) {
	_, cs, objs := apiServer(t)
	ctx := context.Background()
	old, _, err := objs.TenantPod(ctx, "shop", "orders", "orders-sa", "node-a", "orders-db")
	if err != nil {
		t.Fatal(err)
	}
	p, err := cs.CoreV1().Pods("shop").Get(ctx, "orders", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	p.Spec.Containers[0].Env = []corev1.EnvVar{{Name: "BIG", Value: strings.Repeat("x", 1000)}}
	stale := stalePods{"shop/orders": p}
	if err := cs.CoreV1().Pods("shop").Delete(ctx, "orders", metav1.DeleteOptions{GracePeriodSeconds: new(int64)}); err != nil {
		t.Fatal(err)
	}
	pod, vol, err := objs.TenantPod(ctx, "shop", "orders", "orders-sa", "node-a", "orders-db")
	if err != nil {
		t.Fatal(err)
	}
	fresh, _, err := objs.TenantPod(ctx, "shop", "fresh", "orders-sa", "node-a", "orders-db")
	if err != nil {
		t.Fatal(err)
	}
	gets := &countingPods{PodsGetter: cs.CoreV1()}
	check := issuer.CachedPodCheck(stale, gets)
	nodeA := issuer.Caller{Node: "node-a"}
	if err := check(ctx, nodeA, pod, "shop/orders-db", vol); err != nil || gets.n.Load() != 1 {
		t.Errorf("the pod replaced since the cache saw it: %v after %d GETs, want accepted after one", err, gets.n.Load())
	}
	if err := check(ctx, nodeA, fresh, "shop/orders-db", ""); err != nil || gets.n.Load() != 2 {
		t.Errorf("a pod not in the cache: %v after %d GETs, want accepted after the second", err, gets.n.Load())
	}
	// The window CachedPodCheck's doc names: a cache that has not heard
	// of a deletion yet accepts the pod gone, without a GET.
	if err := check(ctx, nodeA, old, "shop/orders-db", ""); err != nil || gets.n.Load() != 2 {
		t.Errorf("the replaced pod, as a cache behind holds it: %v after %d GETs, want accepted from the cache", err, gets.n.Load())
	}

	// What the cache keeps of a pod.
	pc := issuer.NewPodCache(cs.CoreV1())
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go pc.Run(cctx)
	var kept *corev1.Pod
	harness.Eventually(t, 10*time.Second, "the cache of pods", func() (bool, error) {
		var ok bool
		kept, ok = pc.Pod("shop", "orders")
		return ok, nil
	})
	want := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "orders", Namespace: "shop", UID: types.UID(pod.UID), ResourceVersion: kept.ResourceVersion},
		Spec: corev1.PodSpec{NodeName: "node-a", ServiceAccountName: "orders-sa", Volumes: []corev1.Volume{{Name: issuertest.VolumeName,
			VolumeSource: corev1.VolumeSource{CSI: &corev1.CSIVolumeSource{Driver: issuer.DriverName,
				VolumeAttributes: map[string]string{"secretProviderClass": "orders-db"}}}}}},
		Status: corev1.PodStatus{Phase: kept.Status.Phase},
	}
	if !equality.Semantic.DeepEqual(kept, want) {
		t.Errorf("the cache keeps %+v, want %+v", kept, want)
	}
	// A real cache hears of the deletion, and the check then asks.
	if err := cs.CoreV1().Pods("shop").Delete(ctx, "orders", metav1.DeleteOptions{GracePeriodSeconds: new(int64)}); err != nil {
		t.Fatal(err)
	}
	harness.Eventually(t, 10*time.Second, "the deleted pod gone from the cache", func() (bool, error) {
		_, ok := pc.Pod("shop", "orders")
		return !ok, nil
	})
	if err := issuer.CachedPodCheck(pc, cs.CoreV1())(ctx, nodeA, pod, "shop/orders-db", vol); !errors.Is(err, provider.ErrPermissionDenied) {
		t.Errorf("a deleted pod: %v, want PermissionDenied", err)
	}
}
