package issuer_test

import (
	"context"
	"errors"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/ephemeral-secrets/csi-driver/pkg/issuer"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/test/issuertest"
	"github.com/ephemeral-secrets/csi-driver/test/kube"
)

// APIPodCheck against a real API server: only a pod of that UID, on the
// caller's node, of that service account, with a volume of the class
// (that volume when its ID is given) passes.
func TestAPIPodCheck(t *testing.T) {
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
	objs := issuertest.Cluster{CS: cs}
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
	check := issuer.APIPodCheck(cs.CoreV1())
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
		t.Run(tc.name, func(t *testing.T) {
			err := check(ctx, tc.caller, tc.pod, tc.class, tc.volume)
			if tc.ok && err != nil {
				t.Fatalf("refused: %v", err)
			}
			if !tc.ok && !errors.Is(err, provider.ErrPermissionDenied) {
				t.Fatalf("err = %v, want PermissionDenied", err)
			}
		})
	}
	// An API server it cannot reach: Unavailable, not denied.
	c.Stop()
	if err := check(ctx, nodeA, pod, "shop/orders-db", vol); !errors.Is(err, provider.ErrUnavailable) {
		t.Errorf("err = %v, want Unavailable", err)
	}
}
