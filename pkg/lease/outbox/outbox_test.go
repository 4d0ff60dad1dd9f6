package outbox

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	clocktesting "k8s.io/utils/clock/testing"

	"github.com/ephemeral-secrets/csi-driver/pkg/credential"
)

// inventory is the cluster's inventory as the outbox sees it: it records
// the calls made, and fails or refuses them as the test says. The real
// inventory (pkg/inventory, a kube-apiserver) runs under the lease
// manager's and the cluster's tests; these are of the outbox's order and
// retries.
type inventory struct {
	mu    sync.Mutex
	calls []string // "issued l1", "revoked l1"
	err   error
}

func (inv *inventory) call(name string, r credential.Record) error {
	inv.mu.Lock()
	defer inv.mu.Unlock()
	inv.calls = append(inv.calls, name+" "+r.LeaseID)
	return inv.err
}

func (inv *inventory) Issued(_ context.Context, r credential.Record) error {
	return inv.call("issued", r)
}
func (inv *inventory) Revoked(_ context.Context, r credential.Record) error {
	return inv.call("revoked", r)
}

func (inv *inventory) take() []string {
	inv.mu.Lock()
	defer inv.mu.Unlock()
	c := inv.calls
	inv.calls = nil
	return c
}

func newOutbox(inv *inventory, gone func(credential.Record)) (*Outbox, *clocktesting.FakeClock) {
	clk := clocktesting.NewFakeClock(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
	return New(Options{Records: inv, Clock: clk, RetryMin: time.Second, RetryMax: 4 * time.Second, Gone: gone}), clk
}

// Calls are made in the order noted, the latest state of a lease wins,
// and a revocation is final.
func TestOrderLatestWinsRevocationFinal(t *testing.T) {
	ctx := context.Background()
	inv := &inventory{}
	o, _ := newOutbox(inv, nil)
	o.Issued(credential.Record{LeaseID: "new"}) // a rotation: the new lease first,
	o.Revoked(credential.Record{LeaseID: "old"}, time.Time{})
	o.Issued(credential.Record{LeaseID: "l1"})
	o.Issued(credential.Record{LeaseID: "l1"}) // renewed before the first call: one call
	o.Revoked(credential.Record{LeaseID: "l2"}, time.Time{})
	o.Issued(credential.Record{LeaseID: "l2"}) // a renewal noted late: the revocation stands
	o.Flush(ctx)
	want := []string{"issued new", "revoked old", "issued l1", "revoked l2"}
	if got := inv.take(); !slices.Equal(got, want) {
		t.Errorf("calls %v, want %v", got, want)
	}
	o.Flush(ctx)
	if got := inv.take(); len(got) != 0 {
		t.Errorf("calls made twice: %v", got)
	}
}

// A failed call is retried after a backoff on the outbox's clock; a
// release noted for later (an unrevocable lease's expiry) waits for it.
func TestRetriesAndNotBefore(t *testing.T) {
	ctx := context.Background()
	inv := &inventory{err: errors.New("the API server is down")}
	o, clk := newOutbox(inv, nil)
	expiry := clk.Now().Add(time.Hour)
	o.Issued(credential.Record{LeaseID: "l1"})
	o.Revoked(credential.Record{LeaseID: "sts"}, expiry)
	for i, s := range []struct {
		step time.Duration
		want []string
	}{
		{0, []string{"issued l1"}},                        // fails: again in 1 s
		{999 * time.Millisecond, nil},                     //
		{time.Millisecond, []string{"issued l1"}},         // fails: again in 2 s
		{time.Second, nil},                                //
		{time.Second, []string{"issued l1"}},              // fails: again in 4 s
		{4 * time.Second, []string{"issued l1"}},          // fails: again in 4 s (RetryMax)
		{time.Hour, []string{"issued l1", "revoked sts"}}, // the expiry passed
	} {
		clk.Step(s.step)
		wait := o.Flush(ctx)
		if got := inv.take(); !slices.Equal(got, s.want) {
			t.Fatalf("step %d: calls %v, want %v", i, got, s.want)
		}
		if i == 0 && wait != time.Second {
			t.Errorf("Flush after the first failure: next in %s, want 1s", wait)
		}
	}
	inv.mu.Lock()
	inv.err = nil
	inv.mu.Unlock()
	clk.Step(4 * time.Second)
	o.Flush(ctx)
	o.Flush(ctx)
	if got := inv.take(); !slices.Equal(got, []string{"issued l1", "revoked sts"}) {
		t.Errorf("calls once the inventory answers: %v", got)
	}
}

// A record deleted as it was recorded (the kill switch) is not retried:
// Gone is told, once.
func TestRecordGone(t *testing.T) {
	ctx := context.Background()
	inv := &inventory{err: fmt.Errorf("%w: deleted", credential.ErrRecordGone)}
	gone := make(chan credential.Record, 2)
	o, clk := newOutbox(inv, func(r credential.Record) { gone <- r })
	o.Issued(credential.Record{LeaseID: "l1", VolumeID: "v1"})
	o.Flush(ctx)
	if r := <-gone; r.VolumeID != "v1" {
		t.Errorf("Gone told of %+v", r)
	}
	clk.Step(time.Hour)
	o.Flush(ctx)
	if got := inv.take(); !slices.Equal(got, []string{"issued l1"}) {
		t.Errorf("calls %v, want one", got)
	}
}

// Run makes the calls as they are noted, and the retries as the clock
// passes their time.
func TestRun(t *testing.T) {
	inv := &inventory{err: errors.New("down")}
	o, clk := newOutbox(inv, nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { o.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	o.Issued(credential.Record{LeaseID: "l1"})
	calls := func() int {
		inv.mu.Lock()
		defer inv.mu.Unlock()
		return len(inv.calls)
	}
	for deadline := time.Now().Add(30 * time.Second); calls() < 1; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the noted call was not made")
		}
	}
	inv.mu.Lock()
	inv.err = nil
	inv.mu.Unlock()
	// The retry comes as the clock passes it (steps of RetryMin: Run may
	// arm its timer after a step).
	for deadline := time.Now().Add(30 * time.Second); calls() < 2; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the failed call was not retried")
		}
		clk.Step(time.Second)
	}
}
