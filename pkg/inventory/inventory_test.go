package inventory_test

import (
	"context"
	"errors"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/util/workqueue"

	v1alpha1 "github.com/ephemeral-secrets/csi-driver/pkg/apis/ephemeralsecrets/v1alpha1"
	"github.com/ephemeral-secrets/csi-driver/pkg/credential"
	"github.com/ephemeral-secrets/csi-driver/pkg/inventory"
	"github.com/ephemeral-secrets/csi-driver/test/harness"
)

// fastRetries keeps a failing revocation's retries within a test's time.
var fastRetries = inventory.ControllerOptions{
	RateLimiter: workqueue.NewTypedItemExponentialFailureRateLimiter[string](50*time.Millisecond, time.Second),
}

func TestRecorderRecordsALifecycle(t *testing.T) {
	ns := namespace(t)
	pod := newPod(t, ns, "orders-7f9c")
	e := entryFor(pod, "node-a", ns+"-orders-7f9c-abcdefgh")
	rec := inventory.NewRecorder(issuerInv, nil) // no cache: the API server answers
	ctx := context.Background()

	if err := rec.Issuing(ctx, e); err != nil {
		t.Fatal(err)
	}
	if err := rec.Issuing(ctx, e); err != nil { // a retry
		t.Fatalf("Issuing again: %v", err)
	}
	c := get(t, ns, e.LeaseID)
	if c.Status.State != "" || c.Status.BackendName != "" {
		t.Errorf("status %+v, want none (the record is one create; Issued writes the status)", c.Status)
	}
	if !slices.Equal(c.Finalizers, []string{v1alpha1.FinalizerRevoke}) {
		t.Errorf("finalizers %v", c.Finalizers)
	}
	if len(c.OwnerReferences) != 1 || c.OwnerReferences[0].UID != pod.UID || c.OwnerReferences[0].Kind != "Pod" {
		t.Errorf("owner references %+v, want the pod %s", c.OwnerReferences, pod.UID)
	}
	for k, v := range map[string]string{v1alpha1.LabelNode: "node-a", v1alpha1.LabelProvider: "postgres",
		v1alpha1.LabelPodUID: string(pod.UID), v1alpha1.LabelLeaseID: e.LeaseID} {
		if c.Labels[k] != v {
			t.Errorf("label %s = %q, want %q", k, c.Labels[k], v)
		}
	}
	want := v1alpha1.CredentialSpec{
		Pod:  v1alpha1.PodReference{Name: pod.Name, UID: string(pod.UID), ServiceAccount: "default"},
		Node: "node-a", Class: ns + "/orders-db", Provider: "postgres", Role: "main/orders",
		LeaseID: e.LeaseID, VolumeID: e.VolumeID,
	}
	if c.Spec != want {
		t.Errorf("spec %+v, want %+v", c.Spec, want)
	}

	if err := rec.Issued(ctx, e); err != nil {
		t.Fatal(err)
	}
	c = get(t, ns, e.LeaseID)
	if c.Status.State != v1alpha1.StateIssued || c.Status.ExpiresAt == nil || !c.Status.ExpiresAt.Time.Equal(e.ExpiresAt) ||
		c.Status.IssuedAt == nil || !c.Status.IssuedAt.Time.Equal(e.IssuedAt) || c.Status.BackendName != e.Name {
		t.Errorf("status after Issued: %+v", c.Status)
	}
	if !meta.IsStatusConditionTrue(c.Status.Conditions, v1alpha1.ConditionIssued) {
		t.Errorf("conditions %+v: Issued is not True", c.Status.Conditions)
	}
	// An extension moves the expiry only.
	e2 := e
	e2.ExpiresAt = e.ExpiresAt.Add(time.Hour)
	e2.IssuedAt = e.IssuedAt.Add(time.Minute)
	if err := rec.Issued(ctx, e2); err != nil {
		t.Fatal(err)
	}
	c = get(t, ns, e.LeaseID)
	if !c.Status.ExpiresAt.Time.Equal(e2.ExpiresAt) || !c.Status.IssuedAt.Time.Equal(e.IssuedAt) {
		t.Errorf("after an extension: issued %v expires %v", c.Status.IssuedAt, c.Status.ExpiresAt)
	}

	tracked, err := rec.Tracked(ctx)
	if err != nil || !tracked[e.LeaseID] {
		t.Fatalf("Tracked = %v, %v: want %s", tracked, err, e.LeaseID)
	}
	if err := rec.Dropped(ctx, e.LeaseID); err != nil {
		t.Fatal(err)
	}
	gone(t, ns, inventory.Name(e.LeaseID))
	if tracked, err := rec.Tracked(ctx); err != nil || tracked[e.LeaseID] {
		t.Errorf("Tracked after Dropped = %v, %v", tracked, err)
	}
	if err := rec.Dropped(ctx, e.LeaseID); err != nil {
		t.Errorf("Dropped again: %v", err)
	}
	if err := rec.Issued(ctx, e); !errors.Is(err, credential.ErrRecordGone) {
		t.Errorf("Issued after Dropped: %v, want credential.ErrRecordGone", err)
	}
}

func TestRecorderRefusesAnIncompleteEntry(t *testing.T) {
	ns := namespace(t)
	pod := newPod(t, ns, "app")
	rec := inventory.NewRecorder(issuerInv, nil)
	for name, change := range map[string]func(*credential.Record){
		"no node":    func(e *credential.Record) { e.Node = "" },
		"no pod UID": func(e *credential.Record) { e.Pod.UID = "" },
		"no lease":   func(e *credential.Record) { e.LeaseID = "" },
	} {
		e := entryFor(pod, "node-a", ns+"-app-"+strings.ReplaceAll(name, " ", ""))
		change(&e)
		if err := rec.Issuing(context.Background(), e); err == nil {
			t.Errorf("%s: Issuing accepted %+v", name, e)
		}
	}
	l, err := adminInv.List(context.Background(), ns, metav1.ListOptions{})
	if err != nil || len(l.Items) != 0 {
		t.Errorf("records left: %v, %v", l, err)
	}
}

func TestTrackedUsesTheSyncedCache(t *testing.T) {
	ns := namespace(t)
	pod := newPod(t, ns, "app")
	rv := &revoker{}
	rec := startIssuer(t, rv, fastRetries)
	e := entryFor(pod, "node-a", ns+"-app-tracked1")
	record(t, rec, e)
	harness.Eventually(t, 10*time.Second, "the cache tracks the lease", func() (bool, error) {
		tracked, err := rec.Tracked(context.Background())
		return tracked[e.LeaseID], err
	})
	if err := rec.Dropped(context.Background(), e.LeaseID); err != nil {
		t.Fatal(err)
	}
	gone(t, ns, inventory.Name(e.LeaseID))
	if calls := rv.leases(); len(calls) != 0 {
		t.Errorf("Dropped by the issuer itself made the controller revoke %v", calls)
	}
}

// TestKillSwitch: an admin deletes a live credential's record; the
// controller revokes it once, then the record goes.
func TestKillSwitch(t *testing.T) {
	ns := namespace(t)
	pod := newPod(t, ns, "agent")
	rv := &revoker{}
	rec := startIssuer(t, rv, fastRetries)
	rv.setThen(func(ctx context.Context, e credential.Record) error { return rec.Dropped(ctx, e.LeaseID) }) // as the issuer's Drop does
	node := ns + "-a"
	e := entryFor(pod, node, ns+"-agent-killswit")
	record(t, rec, e)
	other := entryFor(pod, node, ns+"-agent-otherone")
	record(t, rec, other)
	w := &withdrawals{}
	watchNode(t, node, w)

	if err := adminInv.Delete(context.Background(), ns, inventory.Name(e.LeaseID), metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	gone(t, ns, inventory.Name(e.LeaseID))
	if calls := rv.leases(); !slices.Equal(calls, []string{e.LeaseID}) {
		t.Errorf("revocations %v, want one of %s", calls, e.LeaseID)
	}
	if got := rv.entries()[0]; got.Pod != e.Pod || got.Role != e.Role || got.Name != e.Name || got.VolumeID != e.VolumeID || !got.ExpiresAt.Equal(e.ExpiresAt) {
		t.Errorf("revoked %+v, want %+v", got, e)
	}
	if c := get(t, ns, other.LeaseID); c.DeletionTimestamp != nil || c.Status.State != v1alpha1.StateIssued {
		t.Errorf("the other record: %+v", c.Status)
	}
	// The node is told, so that it empties the volume.
	harness.Eventually(t, 10*time.Second, "the node told of the deletion", func() (bool, error) {
		return slices.Contains(w.leases(), e.LeaseID), nil
	})
	if calls := w.leases(); slices.Contains(calls, other.LeaseID) {
		t.Errorf("the node was told %v", calls)
	}
}

// TestFailedRevocationKeepsTheRecord: the backend refuses twice; the
// record stays (finalizer held, the condition says why) until a retry
// succeeds.
func TestFailedRevocationKeepsTheRecord(t *testing.T) {
	ns := namespace(t)
	pod := newPod(t, ns, "agent")
	rv := &revoker{}
	rv.failures.Store(2)
	blocked := make(chan struct{})
	var once sync.Once
	rv.then = func(context.Context, credential.Record) error { once.Do(func() { close(blocked) }); return nil }
	slow := inventory.ControllerOptions{
		RateLimiter: workqueue.NewTypedItemExponentialFailureRateLimiter[string](time.Second, time.Second),
	}
	rec := startIssuer(t, rv, slow)
	e := entryFor(pod, "node-a", ns+"-agent-failing1")
	record(t, rec, e)
	if err := adminInv.Delete(context.Background(), ns, inventory.Name(e.LeaseID), metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	harness.Eventually(t, 10*time.Second, "a failed revocation in the record's condition", func() (bool, error) {
		c, err := adminInv.Get(context.Background(), ns, inventory.Name(e.LeaseID))
		if err != nil {
			return false, err
		}
		cond := meta.FindStatusCondition(c.Status.Conditions, v1alpha1.ConditionRevoked)
		return cond != nil && cond.Reason == "RevokeFailed" && strings.Contains(cond.Message, "backend unavailable") &&
			c.Status.State == v1alpha1.StateRevoking && slices.Contains(c.Finalizers, v1alpha1.FinalizerRevoke), nil
	})
	select {
	case <-blocked:
		t.Fatal("revoked before the retries")
	default:
	}
	gone(t, ns, inventory.Name(e.LeaseID))
	if calls := rv.leases(); len(calls) != 3 {
		t.Errorf("revocations %v, want 3 (two failures, one success)", calls)
	}
	// Each retry waited for its backoff (1 s): the record of a failure,
	// a status update, does not bring the record back at once.
	at := rv.times()
	for i := 1; i < len(at); i++ {
		if gap := at[i].Sub(at[i-1]); gap < 900*time.Millisecond {
			t.Errorf("revocation %d came %v after the one before, within the backoff", i+1, gap)
		}
	}
}

// TestPodDeletionRevokesThroughTheGarbageCollector: the Pod is deleted
// (no node involved); Kubernetes' garbage collector deletes its record,
// whose deletion the controller turns into a revocation.
func TestPodDeletionRevokesThroughTheGarbageCollector(t *testing.T) {
	startGC(t)
	ns := namespace(t)
	pod := newPod(t, ns, "worker")
	rv := &revoker{}
	// No resync: only the record's own events reach the controller, so
	// its pod check cannot be what deletes it.
	rec := startIssuer(t, rv, fastRetries)
	e := entryFor(pod, "node-gone", ns+"-worker-gcdelete")
	record(t, rec, e)
	if err := admin.CoreV1().Pods(ns).Delete(context.Background(), pod.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	harness.Eventually(t, 60*time.Second, "the record deleted by the garbage collector and revoked", func() (bool, error) {
		_, err := adminInv.Get(context.Background(), ns, inventory.Name(e.LeaseID))
		return apierrors.IsNotFound(err) && len(rv.leases()) > 0, nil
	})
	if calls := rv.leases(); !slices.Equal(calls, []string{e.LeaseID}) {
		t.Errorf("revocations %v, want one of %s", calls, e.LeaseID)
	}
}

// TestRecordOfAPodGoneIsRevoked: without the garbage collector, the
// controller itself deletes (then revokes) the record of a pod that no
// longer exists, or that was replaced by a pod of the same name.
func TestRecordOfAPodGoneIsRevoked(t *testing.T) {
	ns := namespace(t)
	ctx := context.Background()
	rec := inventory.NewRecorder(issuerInv, nil)
	deleted := newPod(t, ns, "deleted")
	eDeleted := entryFor(deleted, "node-a", ns+"-deleted-podgone1")
	record(t, rec, eDeleted)
	replaced := newPod(t, ns, "replaced")
	eReplaced := entryFor(replaced, "node-a", ns+"-replaced-podgone2")
	record(t, rec, eReplaced)
	alive := newPod(t, ns, "alive")
	eAlive := entryFor(alive, "node-a", ns+"-alive-podalive")
	record(t, rec, eAlive)
	for _, name := range []string{"deleted", "replaced"} {
		if err := admin.CoreV1().Pods(ns).Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	newPod(t, ns, "replaced") // same name, another UID

	rv := &revoker{}
	startIssuer(t, rv, fastRetries)
	gone(t, ns, inventory.Name(eDeleted.LeaseID))
	gone(t, ns, inventory.Name(eReplaced.LeaseID))
	calls := rv.leases()
	slices.Sort(calls)
	if want := []string{eDeleted.LeaseID, eReplaced.LeaseID}; !slices.Equal(calls, want) {
		t.Errorf("revocations %v, want %v", calls, want)
	}
	if c := get(t, ns, eAlive.LeaseID); c.DeletionTimestamp != nil {
		t.Error("the record of a live pod is being deleted")
	}
}

func TestSpecIsImmutable(t *testing.T) {
	ns := namespace(t)
	pod := newPod(t, ns, "app")
	e := entryFor(pod, "node-a", ns+"-app-immutable")
	record(t, inventory.NewRecorder(issuerInv, nil), e)
	for name, change := range map[string]func(*v1alpha1.CredentialSpec){
		"node":     func(s *v1alpha1.CredentialSpec) { s.Node = "node-b" },
		"pod UID":  func(s *v1alpha1.CredentialSpec) { s.Pod.UID = "another" },
		"lease ID": func(s *v1alpha1.CredentialSpec) { s.LeaseID = "another" },
	} {
		c := get(t, ns, e.LeaseID)
		change(&c.Spec)
		_, err := adminInv.Update(context.Background(), c)
		if !apierrors.IsInvalid(err) || !strings.Contains(err.Error(), "spec is immutable") {
			t.Errorf("changing the %s: %v, want spec is immutable", name, err)
		}
	}
	if c := get(t, ns, e.LeaseID); c.Spec.Node != "node-a" || c.Spec.Pod.UID != string(pod.UID) {
		t.Errorf("spec changed: %+v", c.Spec)
	}
}

// TestRecordOfAPodDeletedWhileRunning: the pod goes while the controller
// runs, with no garbage collector: the periodic look at every record
// finds it.
func TestRecordOfAPodDeletedWhileRunning(t *testing.T) {
	ns := namespace(t)
	pod := newPod(t, ns, "short")
	rv := &revoker{}
	rec := startIssuer(t, rv, inventory.ControllerOptions{PodCheckInterval: time.Second})
	e := entryFor(pod, "node-a", ns+"-short-running1")
	record(t, rec, e)
	if err := admin.CoreV1().Pods(ns).Delete(context.Background(), pod.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	gone(t, ns, inventory.Name(e.LeaseID))
	if calls := rv.leases(); !slices.Equal(calls, []string{e.LeaseID}) {
		t.Errorf("revocations %v, want one of %s", calls, e.LeaseID)
	}
}
