package use_test

import (
	"context"
	"errors"
	"net/netip"
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/ephemeral-secrets/csi-driver/pkg/credential"
	"github.com/ephemeral-secrets/csi-driver/pkg/issuer/use"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/test/issuertest"
	"github.com/ephemeral-secrets/csi-driver/test/kube"
)

// KubeResolver against a real API server: a credential's pod's IPs and
// its node's internal and external addresses are expected (not its
// hostname); a pod that is gone, or another pod of that name, has none.
func TestKubeResolver(t *testing.T) {
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
	ctx := context.Background()
	objs := issuertest.Cluster{CS: cs}
	if _, err := objs.Node(ctx, "node-a"); err != nil {
		t.Fatal(err)
	}
	node, err := cs.CoreV1().Nodes().Get(ctx, "node-a", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	node.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "10.0.0.5"},
		{Type: corev1.NodeExternalIP, Address: "203.0.113.5"}, {Type: corev1.NodeHostName, Address: "node-a"}}
	if _, err := cs.CoreV1().Nodes().UpdateStatus(ctx, node, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	pod, _, err := objs.TenantPod(ctx, "shop", "orders", "orders-sa", "node-a", "orders-db")
	if err != nil {
		t.Fatal(err)
	}
	p, err := cs.CoreV1().Pods("shop").Get(ctx, "orders", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	p.Status.PodIP = "10.244.1.7"
	p.Status.PodIPs = []corev1.PodIP{{IP: "10.244.1.7"}, {IP: "fd00::7"}}
	if _, err := cs.CoreV1().Pods("shop").UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	r := use.KubeResolver{Pods: cs.CoreV1(), Nodes: cs.CoreV1()}
	for name, tc := range map[string]struct {
		pod  provider.Pod
		want []string
	}{
		"its pod":             {pod, []string{"10.244.1.7", "fd00::7", "10.0.0.5", "203.0.113.5"}},
		"another of its name": {provider.Pod{Namespace: "shop", Name: "orders", UID: "another"}, nil},
		"a pod that is gone":  {provider.Pod{Namespace: "shop", Name: "gone", UID: "gone"}, nil},
	} {
		got, err := r.Expected(ctx, credential.Record{Pod: tc.pod, Node: "node-a"})
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		want := make([]netip.Addr, len(tc.want))
		for i, a := range tc.want {
			want[i] = netip.MustParseAddr(a)
		}
		if !slices.Equal(got, want) {
			t.Errorf("%s: %v, want %v", name, got, want)
		}
	}
	// A pod with no IP yet (its volumes are mounted before its sandbox
	// has one): its node's addresses, and ErrNoPodAddress so that its
	// sources wait.
	early, _, err := objs.TenantPod(ctx, "shop", "early", "orders-sa", "node-a", "orders-db")
	if err != nil {
		t.Fatal(err)
	}
	got, err := r.Expected(ctx, credential.Record{Pod: early, Node: "node-a"})
	if !errors.Is(err, use.ErrNoPodAddress) || len(got) != 2 {
		t.Errorf("a pod without IPs: %v, %v; want its node's two addresses and ErrNoPodAddress", got, err)
	}
}
