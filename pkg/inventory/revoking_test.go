package inventory_test

import (
	"context"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"

	v1alpha1 "github.com/ephemeral-secrets/csi-driver/pkg/apis/ephemeralsecrets/v1alpha1"
	"github.com/ephemeral-secrets/csi-driver/pkg/inventory"
	"github.com/ephemeral-secrets/csi-driver/pkg/metrics"
	"github.com/ephemeral-secrets/csi-driver/test/harness"
)

// Revoking counts the records being deleted that still wait for their
// revocation, by revoker, with the age of the oldest since its deletion:
// one of the issuer's whose revocation keeps failing (held in Revoking by
// the controller), one of a node's that its node has not released; not a
// live record, not a tombstone, not one released.
func TestRevokingIsTheBacklogOfDeletedRecords(t *testing.T) {
	ctx := context.Background()
	ns := namespace(t)
	pod := newPod(t, ns, "app")
	rv := &revoker{}
	rv.failures.Store(1 << 30) // the backend stays down
	// Retries at least every second, so that the record goes soon once
	// the backend is back (at the end).
	rec := startIssuer(t, rv, inventory.ControllerOptions{
		RateLimiter: workqueue.NewTypedItemExponentialFailureRateLimiter[string](100*time.Millisecond, time.Second),
	})
	stuck, live := entryFor(pod, "node-a", ns+"-app-stuck0001"), entryFor(pod, "node-a", ns+"-app-live00001")
	record(t, rec, stuck)
	record(t, rec, live)
	vault := entryFor(pod, "node-a", ns+"-app-vault0001")
	vault.Provider, vault.Role, vault.Name = "vault", "database/creds/orders", ""
	if err := inventory.NewNodeRecorder(nodeAInv).Issued(ctx, vault); err != nil {
		t.Fatal(err)
	}
	for _, e := range []string{stuck.LeaseID, vault.LeaseID} {
		if err := adminInv.Delete(ctx, ns, inventory.Name(e), metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	harness.Eventually(t, 10*time.Second, "the issuer's record held in Revoking", func() (bool, error) {
		c, err := adminInv.Get(ctx, ns, inventory.Name(stuck.LeaseID))
		if err != nil {
			return false, err
		}
		cond := meta.FindStatusCondition(c.Status.Conditions, v1alpha1.ConditionRevoked)
		return c.Status.State == v1alpha1.StateRevoking && cond != nil && cond.Reason == "RevokeFailed", nil
	})

	// The records of this namespace as a cache holds them (other tests'
	// records are in other namespaces).
	list, err := adminInv.List(ctx, ns, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	store := cache.NewStore(cache.MetaNamespaceKeyFunc)
	var deleted time.Time
	tombstones := 0
	for i := range list.Items {
		c := &list.Items[i]
		if err := store.Add(c); err != nil {
			t.Fatal(err)
		}
		switch {
		case inventory.IsTombstone(c):
			tombstones++
		case c.Spec.LeaseID == stuck.LeaseID:
			deleted = c.DeletionTimestamp.Time
		}
	}
	// The kill left the volume's tombstone, which holds no finalizer.
	if len(list.Items) != 4 || tombstones != 1 || deleted.IsZero() {
		t.Fatalf("records %d (want 3 and a tombstone), tombstones %d, the stuck one deleted at %v", len(list.Items), tombstones, deleted)
	}
	got := inventory.Revoking(store, deleted.Add(90*time.Second))
	// The node record was deleted after the issuer's: its age is at most
	// the issuer's (timestamps have a second's precision).
	if got.Issuer != (metrics.Backlog{Count: 1, Oldest: 90 * time.Second}) || got.Node.Count != 1 ||
		got.Node.Oldest > 90*time.Second || got.Node.Oldest < 80*time.Second {
		t.Errorf("backlog %+v, want the issuer's 1 of 90s and the node's 1 of about 90s", got)
	}

	// Released by its node, the vault record no longer counts.
	if err := inventory.NewNodeRecorder(nodeAInv).Revoked(ctx, vault); err != nil {
		t.Fatal(err)
	}
	gone(t, ns, inventory.Name(vault.LeaseID))
	c, err := adminInv.Get(ctx, ns, inventory.Name(stuck.LeaseID))
	if err != nil {
		t.Fatal(err)
	}
	store = cache.NewStore(cache.MetaNamespaceKeyFunc)
	for _, obj := range []*v1alpha1.Credential{c, get(t, ns, live.LeaseID)} {
		if err := store.Add(obj); err != nil {
			t.Fatal(err)
		}
	}
	if got := inventory.Revoking(store, deleted.Add(time.Minute)); got != (metrics.Revoking{Issuer: metrics.Backlog{Count: 1, Oldest: time.Minute}}) {
		t.Errorf("backlog after the node's release %+v", got)
	}
	// The backend back, the controller revokes it and lets it go (no
	// other test's controller sees it).
	rv.failures.Store(0)
	gone(t, ns, inventory.Name(stuck.LeaseID))
}
