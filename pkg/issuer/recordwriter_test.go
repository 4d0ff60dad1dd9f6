package issuer

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"k8s.io/client-go/util/workqueue"

	"github.com/ephemeral-secrets/csi-driver/pkg/credential"
	"github.com/ephemeral-secrets/csi-driver/test/harness"
)

// statusLog is an Inventory whose Issued notes each write (lease and
// expiry), can be held until released, fails a lease's first writes
// (fails) or finds its record gone (gone).
type statusLog struct {
	inventory
	mu      sync.Mutex
	writes  []string
	hold    chan struct{} // nil: no wait
	entered chan string
	fails   map[string]int
	gone    map[string]bool
}

func (s *statusLog) Issued(ctx context.Context, e credential.Record) error {
	s.entered <- e.LeaseID
	if s.hold != nil {
		select {
		case <-s.hold:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.fails[e.LeaseID] > 0 {
		s.fails[e.LeaseID]--
		return errors.New("the API server is unavailable")
	}
	if s.gone[e.LeaseID] {
		return fmt.Errorf("inventory: lease %s: %w", e.LeaseID, credential.ErrRecordGone)
	}
	s.writes = append(s.writes, fmt.Sprintf("%s@%d", e.LeaseID, e.ExpiresAt.Unix()))
	return nil
}

func (s *statusLog) log() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.writes)
}

func at(lease string, exp int64) credential.Record {
	return credential.Record{LeaseID: lease, ExpiresAt: time.Unix(exp, 0)}
}

// TestRecordWriterCoalesces: one writer, held on a first write while
// more is learnt. A lease has one write pending at most, of what was
// learnt last; a lease forgotten (dropped) is not written; a failed write
// is retried; a record found gone has its role ended (gone), once.
func TestRecordWriterCoalesces(t *testing.T) {
	inv := &statusLog{hold: make(chan struct{}), entered: make(chan string, 100),
		fails: map[string]int{"e": 2}, gone: map[string]bool{"d": true}}
	var goneMu sync.Mutex
	var ended []string
	fast := workqueue.NewTypedItemExponentialFailureRateLimiter[string](time.Millisecond, 10*time.Millisecond)
	w := newRecordWriter(inv, func(_ context.Context, e credential.Record) {
		goneMu.Lock()
		ended = append(ended, e.LeaseID)
		goneMu.Unlock()
	}, 1, fast, deferral{})
	defer w.close(time.Second)

	w.issued(at("a", 1))
	if got := <-inv.entered; got != "a" {
		t.Fatalf("first write: %s", got)
	}
	// Meanwhile: a's extensions, b, c then c's drop, d and e.
	w.issued(at("b", 1))
	w.issued(at("a", 2))
	w.issued(at("c", 1))
	w.issued(at("a", 3))
	w.forget("c")
	w.issued(at("d", 1))
	w.issued(at("e", 1))
	close(inv.hold)
	harness.Eventually(t, 10*time.Second, "the writes made", func() (bool, error) {
		return len(inv.log()) == 4, nil
	})
	// a's first write was under way; its two extensions made one write.
	if got, want := inv.log(), []string{"a@1", "b@1", "a@3", "e@1"}; !slices.Equal(got, want) {
		t.Errorf("writes %v, want %v", got, want)
	}
	goneMu.Lock()
	defer goneMu.Unlock()
	if !slices.Equal(ended, []string{"d"}) {
		t.Errorf("roles ended for a record gone: %v, want d's", ended)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.pending) != 0 {
		t.Errorf("writes still pending: %v", w.pending)
	}
}

// TestCloseWritesWhatIsQueued: Close lets the queued writes out.
func TestCloseWritesWhatIsQueued(t *testing.T) {
	inv := &statusLog{entered: make(chan string, 100)}
	w := newRecordWriter(inv, func(context.Context, credential.Record) {}, 2, nil, deferral{})
	for i := range 20 {
		w.issued(at(fmt.Sprint("l", i), 1))
	}
	w.close(10 * time.Second)
	if n := len(inv.log()); n != 20 {
		t.Errorf("%d of 20 writes made before close returned", n)
	}
}

// TestWritesWaitForABurstToPass: while the issuer is busy minting, a
// write waits (recordDefer at most); once it is not, the write is made.
func TestWritesWaitForABurstToPass(t *testing.T) {
	inv := &statusLog{entered: make(chan string, 100)}
	var busy atomic.Bool
	busy.Store(true)
	w := newRecordWriter(inv, func(context.Context, credential.Record) {}, 2, nil, deferral{busy: busy.Load, max: recordDefer})
	defer w.close(time.Second)
	w.issued(at("a", 1))
	time.Sleep(100 * time.Millisecond) // well within recordDefer
	if n := len(inv.log()); n != 0 {
		t.Fatalf("%d writes made while the issuer was busy", n)
	}
	busy.Store(false)
	harness.Eventually(t, 10*time.Second, "the write made once the burst passed", func() (bool, error) {
		return slices.Equal(inv.log(), []string{"a@1"}), nil
	})
}

// TestABurstDefersAWriteFromWhenItWasQueued: under a burst that does not
// pass, each write waits for recordDefer after it was queued, not after a
// writer took it: the writes queued together go together, however few
// the writers (else they would go one recordDefer apart each).
func TestABurstDefersAWriteFromWhenItWasQueued(t *testing.T) {
	inv := &statusLog{entered: make(chan string, 100)}
	var mu sync.Mutex
	now := time.Unix(1000, 0)
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	w := newRecordWriter(inv, func(context.Context, credential.Record) {}, 1, nil,
		deferral{busy: func() bool { return true }, max: time.Minute, now: clock})
	defer w.close(time.Second)
	for i := range 5 {
		w.issued(at(fmt.Sprint("l", i), 1))
	}
	time.Sleep(50 * time.Millisecond)
	if n := len(inv.log()); n != 0 {
		t.Fatalf("%d writes made within the deferral", n)
	}
	mu.Lock()
	now = now.Add(time.Minute + time.Second) // the clock stops there
	mu.Unlock()
	harness.Eventually(t, 10*time.Second, "every write queued a deferral ago made", func() (bool, error) {
		return len(inv.log()) == 5, nil
	})
}

// TestOneMintHoldsTheStatusWrites: a single mint under way, or one that
// answered less than mintQuiet ago, holds the status writes; they go
// once mintQuiet has passed with no mint.
func TestOneMintHoldsTheStatusWrites(t *testing.T) {
	t0 := time.Unix(1000, 0)
	m := newMintActivity(t0)
	if m.busy(t0) {
		t.Fatal("busy before any mint")
	}
	m.begin()
	if !m.busy(t0.Add(time.Hour)) {
		t.Error("not busy while one mint is under way")
	}
	m.begin()
	m.end(t0)
	if !m.busy(t0.Add(time.Hour)) {
		t.Error("not busy while the second of two mints is under way")
	}
	m.end(t0.Add(time.Second))
	for _, c := range []struct {
		after time.Duration
		busy  bool
	}{{0, true}, {mintQuiet - time.Millisecond, true}, {mintQuiet, false}, {time.Minute, false}} {
		if got := m.busy(t0.Add(time.Second + c.after)); got != c.busy {
			t.Errorf("%v after the last mint: busy %v, want %v", c.after, got, c.busy)
		}
	}
}
