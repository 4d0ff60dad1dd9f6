package inventory_test

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"

	v1alpha1 "github.com/ephemeral-secrets/csi-driver/pkg/apis/ephemeralsecrets/v1alpha1"
	"github.com/ephemeral-secrets/csi-driver/pkg/credential"
	"github.com/ephemeral-secrets/csi-driver/pkg/events"
	"github.com/ephemeral-secrets/csi-driver/pkg/inventory"
	invrecord "github.com/ephemeral-secrets/csi-driver/pkg/inventory/record"
	"github.com/ephemeral-secrets/csi-driver/pkg/issuer"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/kube"
)

// The Recorder is what the issuer looks for to record use.
var _ issuer.UseRecorder = (*inventory.Recorder)(nil)

// useOf is a use of a credential from its pod's address and, when
// thief is set, from a foreign one too.
func useOf(at time.Time, thief string) credential.Usage {
	u := credential.Usage{FirstUsedAt: at, LastUsedAt: at.Add(time.Minute), Sessions: 2, Sampled: true,
		Sources: []credential.Source{{Address: "10.244.1.17", FirstSeen: at}}}
	if thief != "" {
		u.Sources = append(u.Sources, credential.Source{Address: thief, FirstSeen: at.Add(30 * time.Second), Foreign: true})
	}
	return u
}

// TestUsedIsTheRecordsStatus: the issuer's use of a credential lands in
// its record (through the chart's policies, as the issuer), every field
// the API server's schema accepts, the bound too; kubectl get shows its
// LAST-USED and SOURCES; a record gone is credential.ErrRecordGone.
func TestUsedIsTheRecordsStatus(t *testing.T) {
	ctx := context.Background()
	ns := namespace(t)
	pod := newPod(t, ns, "orders")
	rec := startIssuer(t, &revoker{}, fastRetries)
	e := entryFor(pod, ns+"-a", ns+"-used-0001")
	record(t, rec, e)

	at := time.Now().Add(-2 * time.Minute).Truncate(time.Second)
	if err := rec.Used(ctx, e, credential.Usage{Sampled: true}); err != nil {
		t.Fatal(err)
	}
	if c := meta.FindStatusCondition(get(t, ns, e.LeaseID).Status.Conditions, v1alpha1.ConditionUsed); c == nil || c.Reason != v1alpha1.ReasonNeverUsed {
		t.Errorf("Used condition of a credential not used: %+v", c)
	}
	u := useOf(at, "192.0.2.66")
	if err := rec.Used(ctx, e, u); err != nil {
		t.Fatal(err)
	}
	c := get(t, ns, e.LeaseID)
	st := c.Status
	if got := invrecord.UsageOf(st); !usageEqual(got, u) {
		t.Errorf("the record's use %+v, want %+v", got, u)
	}
	if st.State != v1alpha1.StateIssued || !meta.IsStatusConditionTrue(st.Conditions, v1alpha1.ConditionIssued) ||
		!meta.IsStatusConditionTrue(st.Conditions, v1alpha1.ConditionUsed) || st.SourcesSummary != "192.0.2.66(foreign),10.244.1.17" {
		t.Errorf("status %+v", st)
	}

	// kubectl get, as a person reads the inventory.
	out := kubectl(t, "get", "creds", "-n", ns)
	t.Logf("kubectl get creds:\n%s", out)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 2 {
		t.Fatalf("kubectl get creds printed %d lines, want a header and one record", len(lines))
	}
	header, row := strings.Fields(lines[0]), strings.Fields(lines[1])
	col := func(name string) string {
		for i, h := range header {
			if h == name && i < len(row) {
				return row[i]
			}
		}
		t.Errorf("no column %s in %q", name, lines[0])
		return ""
	}
	if got := col("SOURCES"); got != "192.0.2.66(foreign),10.244.1.17" {
		t.Errorf("SOURCES %q", got)
	}
	if got := col("LAST-USED"); got != "61s" && got != "60s" && got != "62s" {
		t.Errorf("LAST-USED %q, want about 61s (a minute after a use two minutes ago)", got)
	}

	// Many sources: the bound (credential.MaxSources) holds, the rest are counted.
	for i := range credential.MaxSources + 2 {
		u.Sources = append(u.Sources, credential.Source{Address: fmt.Sprintf("2001:db8::%x", i+1), FirstSeen: at, Foreign: true})
	}
	if err := rec.Used(ctx, e, u); err != nil {
		t.Fatalf("a use from many addresses: %v", err)
	}
	if st := get(t, ns, e.LeaseID).Status; len(st.Sources) != credential.MaxSources || st.DroppedSources != 4 {
		t.Errorf("%d sources, %d dropped; want %d, 4", len(st.Sources), st.DroppedSources, credential.MaxSources)
	}

	// Gone, or another lease's: ErrRecordGone.
	other := e
	other.LeaseID = ns + "-never-recorded"
	if err := rec.Used(ctx, other, u); !errors.Is(err, credential.ErrRecordGone) {
		t.Errorf("the use of a credential without a record: %v, want ErrRecordGone", err)
	}
}

// usageEqual compares two uses, times to the second (the API's).
func usageEqual(a, b credential.Usage) bool {
	if len(a.Sources) != len(b.Sources) || !a.FirstUsedAt.Equal(b.FirstUsedAt) || !a.LastUsedAt.Equal(b.LastUsedAt) ||
		a.Sessions != b.Sessions || a.Dropped != b.Dropped || a.Sampled != b.Sampled {
		return false
	}
	for i := range a.Sources {
		if a.Sources[i].Address != b.Sources[i].Address || a.Sources[i].Foreign != b.Sources[i].Foreign || !a.Sources[i].FirstSeen.Equal(b.Sources[i].FirstSeen) {
			return false
		}
	}
	return true
}

// TestUsedOnARecordBeingRevoked: the summary at revocation lands while
// the issuer's finalizer holds the record (its revocation failing here).
func TestUsedOnARecordBeingRevoked(t *testing.T) {
	ctx := context.Background()
	ns := namespace(t)
	pod := newPod(t, ns, "orders")
	rv := &revoker{}
	rv.failures.Store(1 << 20)
	rec := startIssuer(t, rv, fastRetries)
	e := entryFor(pod, ns+"-a", ns+"-revoking-01")
	record(t, rec, e)
	if err := adminInv.Delete(ctx, ns, inventory.Name(e.LeaseID), metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	harness.Eventually(t, 10*time.Second, "the record in Revoking", func() (bool, error) {
		return get(t, ns, e.LeaseID).Status.State == v1alpha1.StateRevoking, nil
	})
	if err := rec.Used(ctx, e, credential.Usage{Sampled: true}); err != nil {
		t.Fatalf("the summary of a record being revoked: %v", err)
	}
	if c := meta.FindStatusCondition(get(t, ns, e.LeaseID).Status.Conditions, v1alpha1.ConditionUsed); c == nil || c.Reason != v1alpha1.ReasonNeverUsed {
		t.Errorf("Used condition %+v, want NeverUsed", c)
	}
}

// kubectl runs the real kubectl as the cluster's admin.
func kubectl(t *testing.T, args ...string) string {
	t.Helper()
	bin, err := kube.Tool("kubectl")
	if err != nil {
		t.Fatal(err)
	}
	cfg := filepath.Join(t.TempDir(), "kubeconfig")
	if err := cluster.Kubeconfig(cfg, "", kube.AdminToken); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(bin, append([]string{"--kubeconfig", cfg}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("kubectl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// issuerEvents grants the issuer's service account the right to create
// events, as the chart's issuer ClusterRole does (test/chart checks it
// there).
func issuerEvents(t *testing.T) {
	t.Helper()
	ctx := context.Background()
	err := errors.Join(
		ignoreExists(admin.RbacV1().ClusterRoles().Create(ctx, &rbacv1.ClusterRole{
			ObjectMeta: metav1.ObjectMeta{Name: "esc-test-issuer-events"},
			Rules:      []rbacv1.PolicyRule{{APIGroups: []string{""}, Resources: []string{"events"}, Verbs: []string{"create", "patch"}}},
		}, metav1.CreateOptions{})),
		ignoreExists(admin.RbacV1().ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{
			ObjectMeta: metav1.ObjectMeta{Name: "esc-test-issuer-events"},
			RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: "esc-test-issuer-events"},
			Subjects:   []rbacv1.Subject{{Kind: "ServiceAccount", Namespace: pluginNamespace, Name: issuerAccount}},
		}, metav1.CreateOptions{})))
	if err != nil {
		t.Fatal(err)
	}
}

// warner is an events.Recorder sending as cfg's identity.
func warner(t *testing.T, cfg *rest.Config) *events.Recorder {
	t.Helper()
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return events.NewRecorder(dyn, "ephemeral-secrets-csi-issuer", "")
}

// TestUsedElsewhereWarnsThePod: a use from an address none expected is a
// Warning event on the pod, naming the address, the action and the
// Credential, for each action; without the right to create events, or
// without an event sender, it is an error, never silence.
func TestUsedElsewhereWarnsThePod(t *testing.T) {
	ctx := context.Background()
	issuerEvents(t)
	ns := namespace(t)
	pod := newPod(t, ns, "orders")
	e := entryFor(pod, ns+"-a", ns+"-stolen-001")
	rec := inventory.NewRecorder(issuerInv, nil, inventory.WithWarnings(warner(t, issuerCfg)))
	for i, action := range []string{"alert", "revoke", "record"} {
		addr := fmt.Sprintf("192.0.2.%d", 10+i)
		harness.Eventually(t, 10*time.Second, "the issuer may create events", func() (bool, error) {
			return rec.UsedElsewhere(ctx, e, addr, action) == nil, nil
		})
		evs, err := admin.CoreV1().Events(ns).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.uid=" + string(pod.UID) + ",reason=" + inventory.ReasonUsedElsewhere})
		if err != nil {
			t.Fatal(err)
		}
		var ev *corev1.Event
		for i := range evs.Items {
			if strings.Contains(evs.Items[i].Message, addr) {
				ev = &evs.Items[i]
			}
		}
		if ev == nil {
			t.Fatalf("no %s event naming %s: %+v", inventory.ReasonUsedElsewhere, addr, evs.Items)
		}
		t.Logf("%s: %s", action, ev.Message)
		if ev.Type != corev1.EventTypeWarning || ev.InvolvedObject.Kind != "Pod" || ev.InvolvedObject.Name != pod.Name ||
			!strings.Contains(ev.Message, "action "+action) || !strings.Contains(ev.Message, "Credential "+inventory.Name(e.LeaseID)) {
			t.Errorf("event %s %s %+v: %q", ev.Type, ev.Reason, ev.InvolvedObject, ev.Message)
		}
	}

	// node-a may not create events: the error says so.
	denied := inventory.NewRecorder(issuerInv, nil, inventory.WithWarnings(warner(t, as(nodeAToken))))
	if err := denied.UsedElsewhere(ctx, e, "192.0.2.99", "alert"); err == nil || !strings.Contains(err.Error(), "192.0.2.99") {
		t.Errorf("an event refused: %v, want an error naming the address", err)
	}
	if err := inventory.NewRecorder(issuerInv, nil).UsedElsewhere(ctx, e, "192.0.2.99", "alert"); err == nil {
		t.Error("UsedElsewhere without an event sender succeeded")
	}
}

// TestWithdrawIsTheKillSwitch: the issuer's Withdraw of a live pod's
// credential is a person's kubectl delete: the role is dropped, the
// volume's tombstone refuses it a new credential, the node's watcher
// withdraws the volume; the pod's other volume keeps its credential.
// Withdrawing again, or a record of another pod, is ErrRecordGone and
// deletes nothing.
func TestWithdrawIsTheKillSwitch(t *testing.T) {
	ctx := context.Background()
	sc := newKillScene(t)
	ns, node := sc.ns, sc.node
	w := &withdrawals{}
	watchNode(t, node, w)
	stolen := sc.mustPublish(t, "-agent-stolen01", sc.volA)
	other := sc.mustPublish(t, "-agent-kept0001", sc.volB)
	rec := inventory.NewRecorder(issuerInv, nil)
	e := invrecord.RecordOf(get(t, ns, stolen.ID))

	// A record of the same lease and another pod (a forged entry) is not deleted.
	forged := e
	forged.Pod.UID = "another-pod"
	if err := rec.Withdraw(ctx, forged); !errors.Is(err, credential.ErrRecordGone) {
		t.Errorf("withdrawing a record of another pod: %v, want ErrRecordGone", err)
	}
	if c := get(t, ns, stolen.ID); c.DeletionTimestamp != nil {
		t.Fatal("the forged entry's withdrawal deleted the record")
	}

	if err := rec.Withdraw(ctx, e); err != nil {
		t.Fatal(err)
	}
	gone(t, ns, inventory.Name(stolen.ID))
	if roleExists(t, stolen.Values["username"]) {
		t.Error("the withdrawn credential's role still exists")
	}
	if _, err := adminInv.Get(ctx, ns, inventory.TombstoneName(string(sc.pod.UID), sc.volA)); err != nil {
		t.Errorf("no tombstone: %v", err)
	}
	harness.Eventually(t, 10*time.Second, "the node withdrew the volume", func() (bool, error) {
		for _, c := range w.all() {
			if c[0] == sc.volA {
				return true, nil
			}
		}
		return false, nil
	})
	if _, err := publish(ctx, sc.p, sc.pod, ns+"-agent-again001", sc.volA); !errors.Is(err, provider.ErrPermissionDenied) || !errors.Is(err, issuer.ErrWithdrawn) {
		t.Errorf("a new credential for the withdrawn volume: %v, want withdrawn", err)
	}
	if !roleExists(t, other.Values["username"]) {
		t.Error("the pod's other volume lost its credential")
	}
	if err := rec.Withdraw(ctx, e); !errors.Is(err, credential.ErrRecordGone) {
		t.Errorf("withdrawing again: %v, want ErrRecordGone", err)
	}
	for _, c := range w.all() {
		if c[0] != sc.volA {
			t.Errorf("the node withdrew %s too", c[0])
		}
	}
}
