package inventory_test

import (
	"context"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	storagev1 "k8s.io/api/storage/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	v1alpha1 "github.com/ephemeral-secrets/csi-driver/pkg/apis/ephemeralsecrets/v1alpha1"
	"github.com/ephemeral-secrets/csi-driver/pkg/credential"
	"github.com/ephemeral-secrets/csi-driver/pkg/inventory"
	"github.com/ephemeral-secrets/csi-driver/test/harness"
)

const driverName = "ephemeral-secrets.csi.dev"

// startHousekeeper runs the housekeeper as its own identity (the chart's
// housekeeper role, and a Role reading the issuer's Lease in leaseNS).
func startHousekeeper(t *testing.T, leaseNS string, opts inventory.ControllerOptions) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	_, err := admin.RbacV1().Roles(leaseNS).Create(ctx, &rbacv1.Role{
		ObjectMeta: metav1.ObjectMeta{Name: "housekeeper"},
		Rules:      []rbacv1.PolicyRule{{APIGroups: []string{"coordination.k8s.io"}, Resources: []string{"leases"}, ResourceNames: []string{"issuer"}, Verbs: []string{"get"}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	_, err = admin.RbacV1().RoleBindings(leaseNS).Create(ctx, &rbacv1.RoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "housekeeper"},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "Role", Name: "housekeeper"},
		Subjects:   []rbacv1.Subject{{APIGroup: "rbac.authorization.k8s.io", Kind: "User", Name: "esc-housekeeper"}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ic, err := inventory.NewClient(as(housekeeperToken))
	if err != nil {
		t.Fatal(err)
	}
	cs, err := kubernetes.NewForConfig(as(housekeeperToken))
	if err != nil {
		t.Fatal(err)
	}
	holders := inventory.ClusterHolders{Client: cs, IssuerLeaseNamespace: leaseNS, IssuerLeaseName: "issuer", Driver: driverName}
	inf := inventory.NewInformer(ic, "", 0)
	hk := inventory.NewHousekeeper(ic, inf, cs.CoreV1(), holders, opts)
	done := make(chan struct{}, 2)
	go func() { inf.Run(ctx.Done()); done <- struct{}{} }()
	go func() {
		if err := hk.Run(ctx, 2); err != nil && ctx.Err() == nil {
			t.Error(err)
		}
		done <- struct{}{}
	}()
	t.Cleanup(func() { cancel(); <-done; <-done })
}

// nodeWithPlugin makes a Node and, when registered, its CSINode listing
// the driver, as kubelet does when the node plugin registers.
func nodeWithPlugin(t *testing.T, name string, registered bool) {
	t.Helper()
	ctx := context.Background()
	if _, err := admin.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	cn := &storagev1.CSINode{ObjectMeta: metav1.ObjectMeta{Name: name}}
	if registered {
		cn.Spec.Drivers = []storagev1.CSINodeDriver{{Name: driverName, NodeID: name}}
	}
	if _, err := admin.StorageV1().CSINodes().Create(ctx, cn, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = admin.StorageV1().CSINodes().Delete(ctx, name, metav1.DeleteOptions{})
		_ = admin.CoreV1().Nodes().Delete(ctx, name, metav1.DeleteOptions{})
	})
}

// issuerLease writes the issuer's leader Lease, renewed now (leading) or
// long ago (no leader).
func issuerLease(t *testing.T, ns string, leading bool) {
	t.Helper()
	renew := metav1.NewMicroTime(time.Now())
	if !leading {
		renew = metav1.NewMicroTime(time.Now().Add(-time.Hour))
	}
	id, dur := "issuer-0", int32(3600)
	if !leading {
		dur = 15
	}
	if _, err := admin.CoordinationV1().Leases(ns).Create(context.Background(), &coordinationv1.Lease{
		ObjectMeta: metav1.ObjectMeta{Name: "issuer"},
		Spec:       coordinationv1.LeaseSpec{HolderIdentity: &id, LeaseDurationSeconds: &dur, RenewTime: &renew},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// TestHousekeeperHandsOverRecordsWhoseHolderIsGone: a record being
// deleted goes, HandoverAfter after its deletion, when its holder is gone
// (the issuer without a leader, or uninstalled; the node plugin
// deregistered, or its node gone), with the reason on it; it stays while
// its holder is there (and still unexpired).
func TestHousekeeperHandsOverRecordsWhoseHolderIsGone(t *testing.T) {
	for _, tc := range []struct {
		name     string
		issuer   string // "", "leading", "stale": the issuer's Lease
		node     string // "registered", "deregistered", "gone": the record's node
		provider string // postgres: the issuer's record, else the node's
		handover bool
	}{
		{"issuer uninstalled", "", "registered", "postgres", true},
		{"issuer without a leader", "stale", "registered", "postgres", true},
		{"issuer leading", "leading", "registered", "postgres", false},
		{"node plugin deregistered", "leading", "deregistered", "vault", true},
		{"node gone", "leading", "gone", "aws", true},
		{"node plugin registered", "", "registered", "vault", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			ns := namespace(t)
			switch tc.issuer {
			case "leading":
				issuerLease(t, ns, true)
			case "stale":
				issuerLease(t, ns, false)
			}
			nodeName := "hk-" + ns
			if tc.node != "gone" {
				nodeWithPlugin(t, nodeName, tc.node == "registered")
			}
			pod := newPod(t, ns, "app")
			e := entryFor(pod, nodeName, ns+"-app-0001")
			e.Provider = tc.provider
			if tc.provider == "postgres" {
				record(t, inventory.NewRecorder(issuerInv, nil), e)
			} else if err := adminNodeRecord(ctx, e); err != nil {
				t.Fatal(err)
			}
			name := inventory.Name(e.LeaseID)
			if err := adminInv.Delete(ctx, ns, name, metav1.DeleteOptions{}); err != nil {
				t.Fatal(err)
			}
			c, err := adminInv.Get(ctx, ns, name)
			if err != nil || c.DeletionTimestamp == nil {
				t.Fatalf("the record being deleted: %v, %v", c, err)
			}
			deleted := c.DeletionTimestamp.Time // whole seconds, as the housekeeper reads it
			startHousekeeper(t, ns, inventory.ControllerOptions{HandoverAfter: 2 * time.Second})
			if tc.handover {
				gone(t, ns, name)
				if took := time.Since(deleted); took < 2*time.Second {
					t.Errorf("handed over %s after the deletion, before HandoverAfter", took)
				}
				return
			}
			time.Sleep(5 * time.Second) // past HandoverAfter: it is kept
			c, err = adminInv.Get(ctx, ns, name)
			if err != nil {
				t.Fatalf("the record of a holder that is there went: %v", err)
			}
			if len(c.Finalizers) == 0 {
				t.Errorf("finalizers removed while the holder is there: %+v", c.ObjectMeta)
			}
			if cond := meta.FindStatusCondition(c.Status.Conditions, v1alpha1.ConditionRevoked); cond != nil && cond.Reason == inventory.ReasonHandedOver {
				t.Errorf("condition %+v", cond)
			}
			if _, err := inventory.HandOverAll(ctx, adminInv, "test cleanup"); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// adminNodeRecord writes a node-held record of e as the admin, as its
// node would (the node policy confines node-a's identity to node-a).
func adminNodeRecord(ctx context.Context, e credential.Record) error {
	return inventory.NewNodeRecorder(adminInv).Issued(ctx, e)
}

// TestHousekeeperDeletesTheRecordOfAPodGone: without the issuer and the
// garbage collector, a node's record whose pod is gone is deleted; the
// node (its watcher) then releases it.
func TestHousekeeperDeletesTheRecordOfAPodGone(t *testing.T) {
	ctx := context.Background()
	ns := namespace(t)
	pod := newPod(t, ns, "app")
	e := entryFor(pod, "node-a", ns+"-app-0002")
	e.Provider = "vault"
	if err := inventory.NewNodeRecorder(nodeAInv).Issued(ctx, e); err != nil {
		t.Fatal(err)
	}
	if err := admin.CoreV1().Pods(ns).Delete(ctx, "app", metav1.DeleteOptions{GracePeriodSeconds: new(int64)}); err != nil {
		t.Fatal(err)
	}
	startHousekeeper(t, ns, inventory.ControllerOptions{HandoverAfter: time.Hour})
	harness.Eventually(t, 30*time.Second, "the record of the pod gone being deleted", func() (bool, error) {
		c, err := adminInv.Get(ctx, ns, inventory.Name(e.LeaseID))
		return err == nil && c.DeletionTimestamp != nil, err
	})
	if err := inventory.NewNodeRecorder(nodeAInv).Revoked(ctx, e); err != nil {
		t.Fatal(err)
	}
	gone(t, ns, inventory.Name(e.LeaseID))
}

// TestNodeWatcherReleasesWhatTheNodeNoLongerHolds: a node's record being
// deleted loses the node's finalizer once the node no longer holds its
// lease (an STS session the backend cannot revoke, which the node would
// otherwise keep recorded until it expires), not while it still does.
func TestNodeWatcherReleasesWhatTheNodeNoLongerHolds(t *testing.T) {
	ctx := context.Background()
	ns := namespace(t)
	pod := newPod(t, ns, "app")
	rec := inventory.NewNodeRecorder(nodeAInv)
	held, done := entryFor(pod, "node-a", ns+"-app-held"), entryFor(pod, "node-a", ns+"-app-done")
	for _, e := range []credential.Record{held, done} {
		e.Provider = "aws"
		if err := rec.Issued(ctx, e); err != nil {
			t.Fatal(err)
		}
	}
	var asked atomic.Int32
	w := &withdrawals{}
	cctx, cancel := context.WithCancel(ctx)
	nw := inventory.NewNodeWatcher(nodeAInv, "node-a", w.withdraw, 0)
	nw.ReleaseWhenDone(func(leaseID string) (bool, error) {
		asked.Add(1)
		return leaseID == held.LeaseID, nil
	})
	stopped := make(chan struct{})
	go func() { _ = nw.Run(cctx); close(stopped) }()
	t.Cleanup(func() { cancel(); <-stopped })
	for _, e := range []credential.Record{held, done} {
		if err := adminInv.Delete(ctx, ns, inventory.Name(e.LeaseID), metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	gone(t, ns, inventory.Name(done.LeaseID))
	harness.Eventually(t, 10*time.Second, "the node asked again about the lease it holds", func() (bool, error) { return asked.Load() >= 3, nil })
	c, err := adminInv.Get(ctx, ns, inventory.Name(held.LeaseID))
	if err != nil || !slices.Contains(c.Finalizers, v1alpha1.FinalizerNodeRevoke) {
		t.Fatalf("the record of a lease the node holds: %v, %v", c, err)
	}
	if err := rec.Revoked(ctx, held); err != nil {
		t.Fatal(err)
	}
	gone(t, ns, inventory.Name(held.LeaseID))
}

// TestHandOverAllLetsEveryRecordGo: the uninstall hands over every record
// the issuer or a node holds, deleted or not, with the uninstall hook's
// rights only; a live one keeps existing (its pod's deletion ends it),
// without a finalizer and with the reason.
func TestHandOverAllLetsEveryRecordGo(t *testing.T) {
	ctx := context.Background()
	ns := namespace(t)
	pod := newPod(t, ns, "app")
	issuerE, nodeE, liveE := entryFor(pod, "node-a", ns+"-app-pg"), entryFor(pod, "node-a", ns+"-app-vault"), entryFor(pod, "node-a", ns+"-app-live")
	record(t, inventory.NewRecorder(issuerInv, nil), issuerE)
	record(t, inventory.NewRecorder(issuerInv, nil), liveE)
	nodeE.Provider = "vault"
	if err := inventory.NewNodeRecorder(nodeAInv).Issued(ctx, nodeE); err != nil {
		t.Fatal(err)
	}
	for _, e := range []credential.Record{issuerE, nodeE} {
		if err := adminInv.Delete(ctx, ns, inventory.Name(e.LeaseID), metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	ic, err := inventory.NewClient(as(uninstallToken))
	if err != nil {
		t.Fatal(err)
	}
	if n, err := inventory.Held(ctx, ic); err != nil || n < 3 {
		t.Fatalf("held: %d, %v; want at least 3", n, err)
	}
	if _, err := inventory.HandOverAll(ctx, ic, "the driver is being uninstalled"); err != nil {
		t.Fatal(err)
	}
	gone(t, ns, inventory.Name(issuerE.LeaseID))
	gone(t, ns, inventory.Name(nodeE.LeaseID))
	c := get(t, ns, liveE.LeaseID)
	if len(c.Finalizers) != 0 {
		t.Errorf("finalizers left: %v", c.Finalizers)
	}
	if cond := meta.FindStatusCondition(c.Status.Conditions, v1alpha1.ConditionRevoked); cond == nil || cond.Reason != inventory.ReasonHandedOver {
		t.Errorf("Revoked condition %+v, want reason %s", cond, inventory.ReasonHandedOver)
	}
	if n, err := inventory.Held(ctx, ic); err != nil || n != 0 {
		t.Errorf("held after the hand-over: %d, %v", n, err)
	}
	if err := adminInv.Delete(ctx, ns, c.Name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
		t.Fatal(err)
	}
}
