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

// A volume's calls are made in the order noted, the latest state of a
// lease wins, and a revocation is final.
func TestOrderLatestWinsRevocationFinal(t *testing.T) {
	ctx := context.Background()
	inv := &inventory{}
	o, _ := newOutbox(inv, nil)
	o.Issued(credential.Record{VolumeID: "v1", LeaseID: "new"}) // a rotation: the new lease first,
	o.Revoked(credential.Record{VolumeID: "v1", LeaseID: "old"}, time.Time{})
	o.Issued(credential.Record{VolumeID: "v2", LeaseID: "l1"})
	o.Issued(credential.Record{VolumeID: "v2", LeaseID: "l1"}) // renewed before the first call: one call
	o.Revoked(credential.Record{VolumeID: "v3", LeaseID: "l2"}, time.Time{})
	o.Issued(credential.Record{VolumeID: "v3", LeaseID: "l2"}) // a renewal noted late: the revocation stands
	o.Flush(ctx)
	got := inv.take()
	// Volumes are recorded in parallel: the order holds within each.
	var v1 []string
	for _, c := range got {
		if c == "issued new" || c == "revoked old" {
			v1 = append(v1, c)
		}
	}
	if want := []string{"issued new", "revoked old"}; !slices.Equal(v1, want) {
		t.Errorf("the rotation's calls %v, want %v", v1, want)
	}
	slices.Sort(got)
	if want := []string{"issued l1", "issued new", "revoked l2", "revoked old"}; !slices.Equal(got, want) {
		t.Errorf("calls %v, want %v", got, want)
	}
	o.Flush(ctx)
	if got := inv.take(); len(got) != 0 {
		t.Errorf("calls made twice: %v", got)
	}
}

// slowInventory holds every call until release is closed, and counts the
// calls in flight, overall and per volume.
type slowInventory struct {
	inventory
	release  chan struct{}
	mu       sync.Mutex
	inFlight map[string]int
	most     int // calls in flight at once, overall
	overlap  bool
}

func (s *slowInventory) hold(r credential.Record, name string) error {
	s.mu.Lock()
	s.inFlight[r.VolumeID]++
	n := 0
	for _, v := range s.inFlight {
		n += v
	}
	s.most = max(s.most, n)
	s.overlap = s.overlap || s.inFlight[r.VolumeID] > 1
	s.mu.Unlock()
	<-s.release
	s.mu.Lock()
	s.inFlight[r.VolumeID]--
	s.mu.Unlock()
	return s.call(name, r)
}

func (s *slowInventory) Issued(_ context.Context, r credential.Record) error {
	return s.hold(r, "issued")
}
func (s *slowInventory) Revoked(_ context.Context, r credential.Record) error {
	return s.hold(r, "revoked")
}

// A burst of publishes is recorded in parallel, Workers volumes at once,
// and never two calls of one volume at once.
func TestVolumesRecordedInParallel(t *testing.T) {
	inv := &slowInventory{release: make(chan struct{}), inFlight: map[string]int{}}
	clk := clocktesting.NewFakeClock(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
	o := New(Options{Records: inv, Clock: clk, Workers: 4})
	for i := range 12 {
		v := fmt.Sprintf("v%d", i)
		o.Issued(credential.Record{VolumeID: v, LeaseID: v + "-new"})
		o.Revoked(credential.Record{VolumeID: v, LeaseID: v + "-old"}, time.Time{})
	}
	done := make(chan struct{})
	go func() { o.Flush(context.Background()); close(done) }()
	inFlight := func() int {
		inv.mu.Lock()
		defer inv.mu.Unlock()
		return inv.most
	}
	for deadline := time.Now().Add(30 * time.Second); inFlight() < 4; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d calls in flight at most, want 4 (Workers)", inFlight())
		}
	}
	close(inv.release)
	<-done
	if inv.most != 4 || inv.overlap {
		t.Errorf("%d calls at once (want 4), two of one volume at once: %v", inv.most, inv.overlap)
	}
	calls := inv.take()
	if len(calls) != 24 {
		t.Fatalf("%d calls made, want 24", len(calls))
	}
	for i := range 12 {
		v := fmt.Sprintf("v%d", i)
		if a, b := slices.Index(calls, "issued "+v+"-new"), slices.Index(calls, "revoked "+v+"-old"); a < 0 || b < a {
			t.Errorf("volume %s: the new lease recorded at %d, the old released at %d", v, a, b)
		}
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
		got := inv.take()
		slices.Sort(got) // two volumes: no order between them
		if !slices.Equal(got, s.want) {
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
	got := inv.take()
	slices.Sort(got)
	if !slices.Equal(got, []string{"issued l1", "revoked sts"}) {
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
