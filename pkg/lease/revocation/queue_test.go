package revocation

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"testing"
	"time"

	clocktesting "k8s.io/utils/clock/testing"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// memStore is the queue's part of the store, in memory. The real store
// (tmpfs) runs under the lease manager's tests; these are of the queue's
// scheduling, which the store does not take part in.
type memStore struct {
	mu    sync.Mutex
	revs  map[string]Entry
	lists int   // ListRevocations calls
	fail  error // every write fails with it
}

func newMemStore(revs ...Entry) *memStore {
	s := &memStore{revs: map[string]Entry{}}
	for _, r := range revs {
		s.revs[r.Lease.ID] = r
	}
	return s
}

func (s *memStore) ListRevocations() ([]Entry, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.lists++
	return slices.Collect(maps.Values(s.revs)), nil
}

func (s *memStore) PutRevocation(r Entry) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.fail != nil {
		return s.fail
	}
	s.revs[r.Lease.ID] = r
	return nil
}

func (s *memStore) DeleteRevocation(id string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.fail != nil {
		return s.fail
	}
	delete(s.revs, id)
	return nil
}

func (s *memStore) get(id string) (Entry, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	r, ok := s.revs[id]
	return r, ok
}

func (s *memStore) len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.revs)
}

// backend is a provider whose Revoke the test steers: it answers err,
// and with hold set waits for release first.
type backend struct {
	provider.Provider
	mu       sync.Mutex
	err      error
	calls    []string
	inFlight int
	maxIn    int
	hold     chan struct{} // nil: answer at once
	called   chan string
}

func newBackend() *backend { return &backend{called: make(chan string, 1000)} }

func (b *backend) Revoke(ctx context.Context, l provider.Lease) error {
	b.mu.Lock()
	b.calls = append(b.calls, l.ID)
	b.inFlight++
	b.maxIn = max(b.maxIn, b.inFlight)
	hold, err := b.hold, b.err
	b.mu.Unlock()
	b.called <- l.ID
	if hold != nil {
		select {
		case <-hold:
		case <-ctx.Done():
		}
	}
	b.mu.Lock()
	b.inFlight--
	b.mu.Unlock()
	return err
}

func (b *backend) set(err error) {
	b.mu.Lock()
	b.err = err
	b.mu.Unlock()
}

func (b *backend) callsOf() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Clone(b.calls)
}

var start = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

type fixture struct {
	q     *Queue
	store *memStore
	be    *backend
	clock *clocktesting.FakeClock
	mu    sync.Mutex
	done  map[string]bool // lease ID -> unrevocable, as Revoked was told
}

func newFixture(t *testing.T, opts Options, stored ...Entry) *fixture {
	t.Helper()
	f := &fixture{store: newMemStore(stored...), be: newBackend(), clock: clocktesting.NewFakeClock(start), done: map[string]bool{}}
	reg := &provider.Registry{}
	if err := reg.Register("pg", f.be); err != nil {
		t.Fatal(err)
	}
	opts.Store, opts.Providers, opts.Clock = f.store, reg, f.clock
	opts.Revoked = func(r Entry, unrevocable bool) {
		f.mu.Lock()
		f.done[r.Lease.ID] = unrevocable
		f.mu.Unlock()
	}
	f.q = New(opts)
	t.Cleanup(f.q.Close)
	if err := f.q.Load(); err != nil {
		t.Fatal(err)
	}
	return f
}

func (f *fixture) revoked() map[string]bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return maps.Clone(f.done)
}

func rev(id, volume string) Entry {
	return Entry{Lease: provider.Lease{ID: id, Provider: "pg"}, VolumeID: volume, Reason: "unpublished"}
}

// run starts the workers until the test ends.
func (f *fixture) run(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { f.q.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
}

// waitCalls waits for n more calls of the backend (a guard, not a timing).
func (f *fixture) waitCalls(t *testing.T, n int) {
	t.Helper()
	for range n {
		select {
		case <-f.be.called:
		case <-time.After(30 * time.Second):
			t.Fatalf("the backend was not called (%d calls so far)", len(f.be.callsOf()))
		}
	}
}

// A backlog drains in parallel, never more at once than the workers.
func TestBacklogDrainsInParallel(t *testing.T) {
	const backlog, workers = 40, 4
	f := newFixture(t, Options{Workers: workers})
	hold := make(chan struct{})
	f.be.hold = hold
	for i := range backlog {
		if err := f.q.Add(rev(fmt.Sprintf("l%d", i), fmt.Sprintf("v%d", i))); err != nil {
			t.Fatal(err)
		}
	}
	f.run(t)
	f.waitCalls(t, workers) // every worker holds one
	if got := f.q.Len(); got != backlog {
		t.Errorf("Len %d while the first are in flight, want %d", got, backlog)
	}
	close(hold)
	f.waitCalls(t, backlog-workers)
	// Revoked is told after the entry leaves the index: wait for both.
	for deadline := time.Now().Add(30 * time.Second); (f.q.Len() > 0 || len(f.revoked()) < backlog) && time.Now().Before(deadline); {
		time.Sleep(time.Millisecond)
	}
	if f.q.Len() != 0 || f.store.len() != 0 {
		t.Fatalf("queue %d, store %d after the backend confirmed all", f.q.Len(), f.store.len())
	}
	if f.be.maxIn != workers {
		t.Errorf("%d revocations in flight at most, want %d (the workers)", f.be.maxIn, workers)
	}
	if n := len(f.revoked()); n != backlog {
		t.Errorf("Revoked told of %d, want %d", n, backlog)
	}
	if f.store.lists != 1 {
		t.Errorf("the store's queue listed %d times, want once (at Load)", f.store.lists)
	}
}

// A not-before time and the backoff after failures hold an entry back;
// each failure is recorded on the store; the answer removes it.
func TestNotBeforeAndBackoff(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t, Options{RetryMin: time.Second, RetryMax: 4 * time.Second})
	r := rev("l1", "v1")
	r.NotBefore = start.Add(5 * time.Second)
	if err := f.q.Add(r); err != nil {
		t.Fatal(err)
	}
	f.be.set(provider.ErrUnavailable)
	// At each step: how far the clock moves, and how many calls the
	// backend has seen after RevokeDue.
	steps := []struct {
		step  time.Duration
		calls int
	}{
		{0, 0}, {4 * time.Second, 0}, // within the not-before time
		{time.Second, 1},                   // due: fails, retried in 1 s
		{999 * time.Millisecond, 1},        // not yet
		{time.Millisecond, 2},              // fails, retried in 2 s
		{time.Second, 2}, {time.Second, 3}, // fails, retried in 4 s
		{3 * time.Second, 3}, {time.Second, 4}, // fails, retried in 4 s (RetryMax)
		{4 * time.Second, 5},
	}
	for i, s := range steps {
		f.clock.Step(s.step)
		f.q.RevokeDue(ctx)
		if got := len(f.be.callsOf()); got != s.calls {
			t.Fatalf("step %d (%s since the start): %d calls, want %d", i, f.clock.Since(start), got, s.calls)
		}
	}
	stored, ok := f.store.get("l1")
	if !ok || stored.Attempts != 5 || stored.LastError == "" {
		t.Errorf("stored entry %+v (present %v): want 5 attempts and the last error", stored, ok)
	}
	f.be.set(nil)
	f.clock.Step(4 * time.Second)
	f.q.RevokeDue(ctx)
	if _, ok := f.store.get("l1"); ok || f.q.Len() != 0 || f.q.Queued("l1") {
		t.Error("the entry stayed queued after the backend confirmed")
	}
}

// The workers wait out a not-before time on the queue's clock.
func TestWorkersWaitOutNotBefore(t *testing.T) {
	f := newFixture(t, Options{})
	r := rev("l1", "v1")
	r.NotBefore = start.Add(time.Hour)
	if err := f.q.Add(r); err != nil {
		t.Fatal(err)
	}
	f.run(t)
	f.clock.Step(59 * time.Minute)
	select {
	case id := <-f.be.called:
		t.Fatalf("%s revoked before its not-before time", id)
	case <-time.After(100 * time.Millisecond):
	}
	f.clock.Step(time.Minute)
	f.waitCalls(t, 1)
}

// Expedite makes a volume's graced revocations due now, on the store too.
func TestExpedite(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t, Options{})
	for _, r := range []Entry{rev("a1", "a"), rev("a2", "a"), rev("b1", "b")} {
		r.NotBefore = start.Add(time.Hour)
		if err := f.q.Add(r); err != nil {
			t.Fatal(err)
		}
	}
	if n := f.q.Expedite("a"); n != 2 {
		t.Errorf("Expedite made %d due, want 2", n)
	}
	if r, _ := f.store.get("a1"); !r.NotBefore.IsZero() {
		t.Errorf("stored entry still waits until %s", r.NotBefore)
	}
	f.q.RevokeDue(ctx)
	if got := slices.Sorted(slices.Values(f.be.callsOf())); !slices.Equal(got, []string{"a1", "a2"}) {
		t.Errorf("revoked %v, want a1 a2 (b1 still in its grace)", got)
	}
}

// Load reads the store once; what it read is revoked, and the store is
// not read again for the queue's length, age or lookups.
func TestLoadOnce(t *testing.T) {
	ctx := context.Background()
	old := rev("l1", "v1")
	old.EnqueuedAt = start.Add(-time.Minute)
	newer := rev("l2", "v2")
	newer.EnqueuedAt = start
	f := newFixture(t, Options{}, old, newer)
	if f.q.Len() != 2 || !f.q.Queued("l1") || !f.q.Oldest().Equal(old.EnqueuedAt) {
		t.Fatalf("after Load: Len %d, l1 queued %v, oldest %s", f.q.Len(), f.q.Queued("l1"), f.q.Oldest())
	}
	if err := f.q.Add(rev("l3", "v3")); err != nil {
		t.Fatal(err)
	}
	f.q.RevokeDue(ctx)
	if f.q.Len() != 0 || f.store.len() != 0 || len(f.be.callsOf()) != 3 {
		t.Errorf("Len %d, store %d, calls %v after the backend confirmed all", f.q.Len(), f.store.len(), f.be.callsOf())
	}
	if f.store.lists != 1 {
		t.Errorf("the store's queue listed %d times, want once", f.store.lists)
	}
}

// An entry the store did not take is not queued: nothing is in the
// index that a restart would not find.
func TestAddFailsWithTheStore(t *testing.T) {
	f := newFixture(t, Options{})
	f.store.fail = errors.New("disk gone")
	if err := f.q.Add(rev("l1", "v1")); err == nil {
		t.Fatal("Add succeeded with a failing store")
	}
	if f.q.Queued("l1") || f.q.Len() != 0 {
		t.Error("the index holds an entry the store does not")
	}
}

// Await reports the backend's answer for the leases watched: nil, the
// backend's inability to revoke, or ErrClosed when stopped first.
func TestAwait(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t, Options{})
	f.q.Watch([]string{"l1", "never"})
	if err := f.q.Add(rev("l1", "v1")); err != nil {
		t.Fatal(err)
	}
	// "never" was watched, but its Add never came: nothing to wait for.
	answer := f.q.Await(nil, []string{"l1", "never"})
	f.be.set(provider.ErrNotRevocable)
	f.q.RevokeDue(ctx)
	if err := <-answer; !errors.Is(err, provider.ErrNotRevocable) {
		t.Errorf("Await: %v, want ErrNotRevocable", err)
	}
	if unrevocable, ok := f.revoked()["l1"]; !ok || !unrevocable {
		t.Error("Revoked not told the lease is unrevocable")
	}

	// Withdrawn before: the volume's entries still queued are watched.
	f.be.set(provider.ErrUnavailable)
	if err := f.q.Add(rev("l2", "v2")); err != nil {
		t.Fatal(err)
	}
	ids := f.q.WatchVolume("v2")
	stop := make(chan struct{})
	answer = f.q.Await(stop, ids)
	f.q.RevokeDue(ctx) // fails: no answer yet
	select {
	case err := <-answer:
		t.Fatalf("Await answered %v after a failed attempt", err)
	default:
	}
	close(stop)
	if err := <-answer; !errors.Is(err, ErrClosed) {
		t.Errorf("Await after stop: %v, want ErrClosed", err)
	}
}

// A lease added again while it is being revoked is revoked again, with
// what the later Add holds, and stays on the store until then.
func TestAddedAgainWhileRevoked(t *testing.T) {
	f := newFixture(t, Options{Workers: 1})
	hold := make(chan struct{})
	f.be.hold = hold
	if err := f.q.Add(rev("l1", "v1")); err != nil {
		t.Fatal(err)
	}
	f.run(t)
	f.waitCalls(t, 1)
	again := rev("l1", "v1")
	again.Lease.Handle = map[string]string{"token": "a later record holds it"}
	if err := f.q.Add(again); err != nil {
		t.Fatal(err)
	}
	f.be.mu.Lock()
	f.be.hold = nil
	f.be.mu.Unlock()
	close(hold)
	f.waitCalls(t, 1)
	for deadline := time.Now().Add(30 * time.Second); f.q.Len() > 0 && time.Now().Before(deadline); {
		time.Sleep(time.Millisecond)
	}
	if f.q.Len() != 0 || f.store.len() != 0 {
		t.Errorf("queue %d, store %d after the second revocation", f.q.Len(), f.store.len())
	}
}

// A Run that ended leaves the queue to the next Run (the manager may be
// run again), and Close ends it for good.
func TestRunAgain(t *testing.T) {
	f := newFixture(t, Options{})
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	f.q.Run(ctx) // ends at once
	if err := f.q.Add(rev("l1", "v1")); err != nil {
		t.Fatal(err)
	}
	f.run(t)
	f.waitCalls(t, 1)
	f.q.Close()
	f.q.Run(context.Background()) // closed: returns at once
}
