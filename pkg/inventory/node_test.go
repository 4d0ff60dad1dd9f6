package inventory_test

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	v1alpha1 "github.com/ephemeral-secrets/csi-driver/pkg/apis/ephemeralsecrets/v1alpha1"
	"github.com/ephemeral-secrets/csi-driver/pkg/credential"
	"github.com/ephemeral-secrets/csi-driver/pkg/inventory"
	"github.com/ephemeral-secrets/csi-driver/test/harness"
)

// withdrawals records what a NodeWatcher tells its node.
type withdrawals struct {
	mu       sync.Mutex
	calls    [][3]string
	failures int // the first ones fail, as a manager not ready yet does
	then     func(volumeID, leaseID string)
}

func (w *withdrawals) withdraw(_ context.Context, volumeID, leaseID, reason string) error {
	w.mu.Lock()
	w.calls = append(w.calls, [3]string{volumeID, leaseID, reason})
	w.failures--
	fail := w.failures >= 0
	w.mu.Unlock()
	if fail {
		return errors.New("lease manager not ready")
	}
	if w.then != nil {
		w.then(volumeID, leaseID)
	}
	return nil
}

func (w *withdrawals) all() [][3]string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return slices.Clone(w.calls)
}

func (w *withdrawals) leases() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []string
	for _, c := range w.calls {
		out = append(out, c[1])
	}
	return out
}

// watchNode runs node's NodeWatcher, as node-a's identity, until the test
// ends.
func watchNode(t *testing.T, node string, w *withdrawals) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	nw := inventory.NewNodeWatcher(nodeAInv, node, w.withdraw, 0)
	done := make(chan struct{})
	go func() { _ = nw.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	harness.Eventually(t, 10*time.Second, "the node watcher synced", func() (bool, error) { return nw.HasSynced(), nil })
}

// TestNodeRecorderAndWatcher: node-a records a Vault credential of its
// own; an admin deletes it (the kill switch); node-a's watcher tells the
// node once, the node revokes and releases the record. Records of another
// node, deleted too, are never told to node-a.
func TestNodeRecorderAndWatcher(t *testing.T) {
	ns := namespace(t)
	ctx := context.Background()
	pod := newPod(t, ns, "vault-app")
	nodeA, nodeB := ns+"-a", ns+"-b" // nodes of this test alone: other tests' records are not told
	nodeRec := inventory.NewNodeRecorder(nodeAInv)
	mine := entryFor(pod, nodeA, ns+"-vault-app-mine0001")
	mine.Provider, mine.Role, mine.Name = "vault", "database/creds/orders", ""
	if err := nodeRec.Issued(ctx, mine); err != nil {
		t.Fatal(err)
	}
	renewed := mine
	renewed.ExpiresAt = mine.ExpiresAt.Add(time.Hour)
	if err := nodeRec.Issued(ctx, renewed); err != nil { // a renewal
		t.Fatal(err)
	}
	c := get(t, ns, mine.LeaseID)
	if !slices.Equal(c.Finalizers, []string{v1alpha1.FinalizerNodeRevoke}) || c.Status.State != v1alpha1.StateIssued ||
		!c.Status.ExpiresAt.Time.Equal(renewed.ExpiresAt) || c.Labels[v1alpha1.LabelProvider] != "vault" {
		t.Fatalf("node record: finalizers %v, status %+v", c.Finalizers, c.Status)
	}
	// Another node's records, one of the issuer's, one of node-b's own.
	theirs := entryFor(pod, nodeB, ns+"-vault-app-theirs01")
	record(t, inventory.NewRecorder(issuerInv, nil), theirs)

	w := &withdrawals{}
	revoked := make(chan string, 4)
	w.then = func(volumeID, leaseID string) {
		// The node revokes what it holds, then lets the record go.
		e := mine
		e.LeaseID, e.VolumeID = leaseID, volumeID
		if err := nodeRec.Revoked(ctx, e); err != nil {
			t.Error(err)
		}
		revoked <- leaseID
	}
	watchNode(t, nodeA, w)
	for _, e := range []credential.Record{theirs, mine} {
		if err := adminInv.Delete(ctx, ns, inventory.Name(e.LeaseID), metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	select {
	case got := <-revoked:
		if got != mine.LeaseID {
			t.Fatalf("node-a was told of %s", got)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("node-a was not told of its record's deletion")
	}
	gone(t, ns, inventory.Name(mine.LeaseID))
	// Node-b's record stays, held by the issuer's finalizer (no
	// controller runs here), and was never told to node-a.
	if c := get(t, ns, theirs.LeaseID); c.DeletionTimestamp == nil {
		t.Error("node-b's record is not being deleted")
	}
	if calls := w.leases(); !slices.Equal(calls, []string{mine.LeaseID}) {
		t.Errorf("node-a was told %v, want %s once", calls, mine.LeaseID)
	}
	if c := w.all()[0]; c[0] != mine.VolumeID || c[2] == "" {
		t.Errorf("withdraw(%q, %q, %q)", c[0], c[1], c[2])
	}
	// A drop leaves a record being deleted to the controller (none runs
	// here): node-b's record stays; the test then lets it go itself.
	if err := inventory.NewRecorder(adminInv, nil).Dropped(ctx, theirs.LeaseID); err != nil {
		t.Fatal(err)
	}
	c = get(t, ns, theirs.LeaseID)
	if !slices.Contains(c.Finalizers, v1alpha1.FinalizerRevoke) {
		t.Fatal("a drop released a record being deleted: the controller could not leave its tombstone")
	}
	c.Finalizers = nil
	if _, err := adminInv.Update(ctx, c); err != nil {
		t.Fatal(err)
	}
	gone(t, ns, inventory.Name(theirs.LeaseID))
}

// TestNodeRecorderRefusesADeletedRecord: a renewal of a credential whose
// record is being deleted says credential.ErrRecordGone, so the node revokes it.
func TestNodeRecorderRefusesADeletedRecord(t *testing.T) {
	ns := namespace(t)
	ctx := context.Background()
	pod := newPod(t, ns, "app")
	nodeRec := inventory.NewNodeRecorder(nodeAInv)
	e := entryFor(pod, "node-a", ns+"-app-deleting1")
	if err := nodeRec.Issued(ctx, e); err != nil {
		t.Fatal(err)
	}
	if err := adminInv.Delete(ctx, ns, inventory.Name(e.LeaseID), metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := nodeRec.Issued(ctx, e); !errors.Is(err, credential.ErrRecordGone) {
		t.Errorf("Issued on a record being deleted: %v, want credential.ErrRecordGone", err)
	}
	if err := nodeRec.Revoked(ctx, e); err != nil {
		t.Fatal(err)
	}
	gone(t, ns, inventory.Name(e.LeaseID))
	if err := nodeRec.Revoked(ctx, e); err != nil {
		t.Errorf("Revoked again: %v", err)
	}
}

// TestWatcherToldOfRecordsDeletedWhileItWasDown: a record deleted while
// the node plugin was down (its finalizer held it) is told at start-up,
// again until the node takes it.
func TestWatcherToldOfRecordsDeletedWhileItWasDown(t *testing.T) {
	ns := namespace(t)
	ctx := context.Background()
	pod := newPod(t, ns, "app")
	nodeRec := inventory.NewNodeRecorder(nodeAInv)
	e := entryFor(pod, ns+"-a", ns+"-app-whiledown")
	if err := nodeRec.Issued(ctx, e); err != nil {
		t.Fatal(err)
	}
	if err := adminInv.Delete(ctx, ns, inventory.Name(e.LeaseID), metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	w := &withdrawals{failures: 2} // the lease manager is still recovering
	watchNode(t, ns+"-a", w)
	harness.Eventually(t, 10*time.Second, "node-a told at start-up, until it took it", func() (bool, error) {
		return len(w.leases()) == 3, nil
	})
	if calls := w.leases(); !slices.Equal(calls, []string{e.LeaseID, e.LeaseID, e.LeaseID}) {
		t.Errorf("withdrawals %v", calls)
	}
	if err := nodeRec.Revoked(ctx, e); err != nil {
		t.Fatal(err)
	}
	gone(t, ns, inventory.Name(e.LeaseID))
}

// TestNodeRecordOfADeadNodeGoesAtExpiry: a node-revoked record being
// deleted whose node never answers is let go by the issuer's controller
// once the credential expired (the backend ended it), never before.
func TestNodeRecordOfADeadNodeGoesAtExpiry(t *testing.T) {
	ns := namespace(t)
	ctx := context.Background()
	pod := newPod(t, ns, "app")
	nodeRec := inventory.NewNodeRecorder(nodeAInv)
	expired := entryFor(pod, "node-a", ns+"-app-expired01")
	expired.ExpiresAt = time.Now().Add(-time.Minute).Truncate(time.Second)
	live := entryFor(pod, "node-a", ns+"-app-notexpired")
	for _, e := range []credential.Record{expired, live} {
		if err := nodeRec.Issued(ctx, e); err != nil {
			t.Fatal(err)
		}
		if err := adminInv.Delete(ctx, ns, inventory.Name(e.LeaseID), metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	rv := &revoker{}
	startIssuer(t, rv, inventory.ControllerOptions{ExpiryGrace: time.Second})
	gone(t, ns, inventory.Name(expired.LeaseID))
	c, err := adminInv.Get(ctx, ns, inventory.Name(live.LeaseID))
	if err != nil || !slices.Contains(c.Finalizers, v1alpha1.FinalizerNodeRevoke) {
		t.Errorf("the record of a credential not expired: %v, %v", c, err)
	}
	if calls := rv.leases(); len(calls) != 0 {
		t.Errorf("the issuer revoked node-held credentials %v", calls)
	}
	if err := nodeRec.Revoked(ctx, live); err != nil && !apierrors.IsNotFound(err) {
		t.Fatal(err)
	}
}
