package lease

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/storage"
	"github.com/ephemeral-secrets/csi-driver/test/faults"
)

// checkWithdrawn checks what a withdrawn volume must look like to its pod
// and the backend once the revocation queue has drained.
func checkWithdrawn(t *testing.T, n *node, m *Manager, v Volume, when string) {
	t.Helper()
	ctx := context.Background()
	if !n.store.IsMounted(v.TargetPath) {
		t.Errorf("%s: the withdrawn volume is no longer mounted", when)
	} else if got := n.names(v.TargetPath); len(got) != 0 {
		t.Errorf("%s: the withdrawn volume still shows %v", when, got)
	}
	meta, err := n.store.ReadMetadata(v.ID)
	if err != nil {
		t.Fatalf("%s: %v", when, err)
	}
	if meta.State != StateWithdrawn || meta.LeaseID != "" {
		t.Errorf("%s: record is %s naming lease %q, want withdrawn naming none", when, meta.State, meta.LeaseID)
	}
	if ls, _ := n.store.ListLeases(v.ID); len(ls) > 0 {
		t.Errorf("%s: %d lease records left", when, len(ls))
	}
	m.drain(ctx)
	if c := n.podCredentials(v.Mount.Pod.Name); c > 0 {
		t.Errorf("%s: %d credentials of the pod alive after the withdrawal", when, c)
	}
}

func TestWithdrawRevokesAndKeepsTheVolumeEmpty(t *testing.T) {
	inTiers(t, time.Hour, testWithdrawRevokesAndKeepsTheVolumeEmpty)
}

func testWithdrawRevokesAndKeepsTheVolumeEmpty(t *testing.T, n *node) {
	ctx := context.Background()
	m := n.manager(n.store, n.prov, Options{})
	defer m.Close()
	if err := m.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	v := n.volume("w1")
	publish(t, m, v)
	other := n.volume("w2")
	publish(t, m, other)
	info, err := m.Info(v.ID)
	if err != nil {
		t.Fatal(err)
	}
	role := n.credential(info.LeaseID)

	confirmed, err := m.Withdraw(ctx, v.ID, "given back")
	if err != nil {
		t.Fatal(err)
	}
	// At once, before the backend is asked: the files are gone.
	if got := n.names(v.TargetPath); len(got) != 0 {
		t.Fatalf("files still visible right after Withdraw: %v", got)
	}
	select {
	case err := <-confirmed:
		t.Fatalf("confirmed (%v) before the backend was asked", err)
	default:
	}
	m.drain(ctx)
	select {
	case err := <-confirmed:
		if err != nil {
			t.Fatalf("confirmed with %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no confirmation after the queue drained")
	}
	if n.alive(ctx)[role] {
		t.Fatalf("role %s alive after the confirmation", role)
	}
	checkWithdrawn(t, n, m, v, "after withdraw")
	if err := n.login(ctx, other.TargetPath); err != nil {
		t.Errorf("another volume's credential stopped working: %v", err)
	}

	// A republish (kubelet's periodic one) issues nothing; a renewal that
	// was due does nothing; a second withdrawal is fine.
	publish(t, m, v)
	m.expireIn(v.ID, -time.Second) // a lapsed lease is replaced, unless withdrawn
	m.renewNow(v.ID)
	if got := n.names(v.TargetPath); len(got) != 0 {
		t.Errorf("a renewal of the withdrawn volume wrote %v", got)
	}
	if ls, _ := n.store.ListLeases(v.ID); len(ls) > 0 {
		t.Errorf("a renewal of the withdrawn volume recorded %d leases", len(ls))
	}
	again, err := m.Withdraw(ctx, v.ID, "killed")
	if err != nil {
		t.Fatal(err)
	}
	m.drain(ctx)
	select {
	case err := <-again:
		if err != nil {
			t.Errorf("second withdrawal: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Error("second withdrawal: no confirmation after the queue drained")
	}
	checkWithdrawn(t, n, m, v, "after republish and renewal")
	if in, on := m.Live(testNS); in != 1 || on != 1 {
		t.Errorf("live credentials %d in namespace, %d on node; want 1 and 1", in, on)
	}

	// A restart keeps it withdrawn.
	m.Close()
	m2 := n.manager(n.store, n.prov, Options{})
	defer m2.Close()
	if err := m2.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	publish(t, m2, v)
	checkWithdrawn(t, n, m2, v, "after a restart")

	// Unpublish cleans up as usual.
	unpublish(t, m2, v)
	if n.store.IsMounted(v.TargetPath) {
		t.Error("target mounted after unpublish")
	}
	if _, err := n.store.ReadMetadata(v.ID); !errors.Is(err, storage.ErrVolumeNotFound) {
		t.Errorf("withdrawn volume still recorded after unpublish: %v", err)
	}
	if _, err := m2.Withdraw(ctx, v.ID, "given back"); !errors.Is(err, ErrUnknownVolume) {
		t.Errorf("withdraw of an unpublished volume: %v, want ErrUnknownVolume", err)
	}
	unpublish(t, m2, other)
	m2.drain(ctx)
	if alive := n.alive(ctx); len(alive) > 0 {
		t.Errorf("roles left: %v", alive)
	}
}

// The backend refuses the revocation, then the manager stops: the waiter
// hears ErrClosed, and the next start revokes.
func TestWithdrawConfirmsClosedWhenTheManagerStops(t *testing.T) {
	inTiers(t, time.Hour, testWithdrawConfirmsClosedWhenTheManagerStops)
}

func testWithdrawConfirmsClosedWhenTheManagerStops(t *testing.T, n *node) {
	ctx := context.Background()
	fp := &faults.Provider{Provider: n.prov}
	m := n.manager(n.store, fp, Options{RetryMin: time.Hour})
	if err := m.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	v := n.volume("w3")
	publish(t, m, v)
	fp.Inject("Revoke", faults.Error)
	confirmed, err := m.Withdraw(ctx, v.ID, "killed")
	if err != nil {
		t.Fatal(err)
	}
	m.drain(ctx)
	if len(n.alive(ctx)) != 1 {
		t.Fatal("the injected failure did not keep the role")
	}
	m.Close()
	select {
	case err := <-confirmed:
		if !errors.Is(err, ErrClosed) {
			t.Fatalf("confirmed with %v, want ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no answer after Close")
	}
	m2 := n.manager(n.store, n.prov, Options{})
	defer m2.Close()
	if err := m2.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	checkWithdrawn(t, n, m2, v, "after a restart")
	unpublish(t, m2, v)
}

func TestWithdrawOfAnUnrevocableCredentialSaysSo(t *testing.T) {
	inTiers(t, time.Hour, testWithdrawOfAnUnrevocableCredentialSaysSo)
}

func testWithdrawOfAnUnrevocableCredentialSaysSo(t *testing.T, n *node) {
	ctx := context.Background()
	m := n.manager(n.store, unrevocable{n.prov}, Options{})
	defer m.Close()
	if err := m.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	v := n.volume("w4")
	publish(t, m, v)
	confirmed, err := m.Withdraw(ctx, v.ID, "given back")
	if err != nil {
		t.Fatal(err)
	}
	m.drain(ctx)
	select {
	case err := <-confirmed:
		if !errors.Is(err, provider.ErrNotRevocable) {
			t.Fatalf("confirmed with %v, want ErrNotRevocable", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no answer after the queue drained")
	}
	if q, _ := n.store.ListRevocations(); len(q) != 0 {
		t.Errorf("%d revocations queued after the backend said it cannot", len(q))
	}
	unpublish(t, m, v) // the node's clean-up drops the role
}
