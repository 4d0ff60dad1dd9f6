package issuer

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"

	"github.com/ephemeral-secrets/csi-driver/pkg/credential"
)

// recordWriter tells the Inventory what became of a credential
// (Inventory.Issued: issued, or extended until when) off the path of the
// request that did it. A mint writes its record once, as its role is
// made (Inventory.Issuing); the record's status follows here, so a mint
// waits for one write of the API server and an extension for none.
//
// Writes are coalesced: a lease has at most one write pending, of what
// was learnt last (an extension queued behind its mint's status replaces
// it), and a lease dropped before its write is not written at all
// (forget). A failed write is retried with backoff until it succeeds or
// the lease is dropped. While mints are under way, or one answered less
// than mintQuiet ago (busy: mintActivity), a write waits, recordDefer at
// most after it was queued (so that under a sustained stream of mints
// the writes still flow, that long behind): a write nobody waits for
// never takes the API server's time from a mint somebody waits for (a
// status write costs it about twice a record's creation), and the
// writes follow, coalescing meanwhile. A record found deleted (the kill
// switch, or the pod's deletion, while the role was being made) has its
// role ended by gone: its revocation may have run before the role
// existed.
type recordWriter struct {
	inv   Inventory
	gone  func(ctx context.Context, e credential.Record)
	queue workqueue.TypedRateLimitingInterface[string]
	hold  deferral

	mu      sync.Mutex
	pending map[string]pendingWrite // by lease ID

	cancel  context.CancelFunc
	workers sync.WaitGroup
}

// Record writer defaults.
const (
	recordWorkers = 8
	// recordDefer is how long a write waits at most for a burst of
	// mints to pass; recordPoll how often it looks.
	recordDefer = 10 * time.Second
	recordPoll  = 10 * time.Millisecond
	// recordCallTimeout bounds one write.
	recordCallTimeout = 30 * time.Second
	// recordDrain is how long close lets the writes queued go out.
	recordDrain = 5 * time.Second
)

// mintQuiet is how long after a mint's answer the status writes still
// wait: the next of mints asked one after another (a node plugin's
// publishes in turn) comes sooner than that.
const mintQuiet = 20 * time.Millisecond

// mintActivity counts the mints under way and remembers when the last
// one ended: busy tells the status writes to wait. Its times are read
// against epoch: given time.Now()'s readings, on the monotonic clock (a
// step of the wall clock changes nothing), and never the issuer's
// injected clock, which a test may hold still.
type mintActivity struct {
	epoch   time.Time
	under   atomic.Int64
	ended   atomic.Bool
	lastEnd atomic.Int64 // since epoch
}

func newMintActivity(epoch time.Time) *mintActivity { return &mintActivity{epoch: epoch} }

func (m *mintActivity) begin() { m.under.Add(1) }

func (m *mintActivity) end(now time.Time) {
	m.lastEnd.Store(int64(now.Sub(m.epoch)))
	m.ended.Store(true)
	m.under.Add(-1)
}

// busy reports whether a mint is under way or ended less than mintQuiet
// before now.
func (m *mintActivity) busy(now time.Time) bool {
	return m.under.Load() > 0 || m.ended.Load() && int64(now.Sub(m.epoch))-m.lastEnd.Load() < int64(mintQuiet)
}

// pendingWrite is the write a lease waits for: what was learnt last, and
// when its first write still pending was queued.
type pendingWrite struct {
	e      credential.Record
	queued time.Time
}

// deferral tells when writes wait: while busy says so (nil: never), for
// max at most after they were queued, by the clock now (nil: time.Now).
type deferral struct {
	busy func() bool
	max  time.Duration
	now  func() time.Time
}

// newRecordWriter starts workers writers to inv; rl spaces the retries
// of a lease whose write failed (nil: 100 ms doubling up to 30 s); d
// tells when the writes should wait (a burst of mints).
func newRecordWriter(inv Inventory, gone func(context.Context, credential.Record), workers int, rl workqueue.TypedRateLimiter[string], d deferral) *recordWriter {
	if rl == nil {
		rl = workqueue.NewTypedItemExponentialFailureRateLimiter[string](100*time.Millisecond, 30*time.Second)
	}
	if d.now == nil {
		d.now = time.Now
	}
	ctx, cancel := context.WithCancel(context.Background())
	w := &recordWriter{
		inv: inv, gone: gone, hold: d, pending: map[string]pendingWrite{}, cancel: cancel,
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(rl,
			workqueue.TypedRateLimitingQueueConfig[string]{Name: "credential-records"}),
	}
	for range max(workers, 1) {
		w.workers.Add(1)
		go func() {
			defer w.workers.Done()
			for w.next(ctx) {
			}
		}()
	}
	return w
}

// issued queues the write of e (replacing any of its lease not yet made).
func (w *recordWriter) issued(e credential.Record) {
	w.mu.Lock()
	p, ok := w.pending[e.LeaseID]
	if !ok {
		p.queued = w.hold.now()
	}
	p.e = e
	w.pending[e.LeaseID] = p
	w.mu.Unlock()
	w.queue.Add(e.LeaseID)
}

// forget drops the write pending for leaseID, if any: its credential is
// gone, and so is (or goes) its record.
func (w *recordWriter) forget(leaseID string) {
	w.mu.Lock()
	delete(w.pending, leaseID)
	w.mu.Unlock()
}

// next writes one lease's record; false once the writer is closed.
func (w *recordWriter) next(ctx context.Context) bool {
	leaseID, shutdown := w.queue.Get()
	if shutdown {
		return false
	}
	defer w.queue.Done(leaseID)
	w.mu.Lock()
	p, ok := w.pending[leaseID]
	w.mu.Unlock()
	if ok {
		w.yield(ctx, p.queued)
		w.mu.Lock()
		p, ok = w.pending[leaseID] // what was learnt meanwhile, or dropped
		w.mu.Unlock()
	}
	if !ok {
		w.queue.Forget(leaseID)
		return true
	}
	e := p.e
	cctx, cancel := context.WithTimeout(ctx, recordCallTimeout)
	defer cancel()
	err := w.inv.Issued(cctx, e)
	switch {
	case errors.Is(err, credential.ErrRecordGone):
		w.gone(cctx, e)
	case err != nil:
		if ctx.Err() == nil {
			klog.ErrorS(err, "Recording an issued credential; retrying", "lease", leaseID)
			w.queue.AddRateLimited(leaseID)
		}
		return true
	}
	w.queue.Forget(leaseID)
	w.mu.Lock()
	if cur, ok := w.pending[leaseID]; ok && cur.e == e {
		delete(w.pending, leaseID) // else a newer one came meanwhile: the queue has the key again
	}
	w.mu.Unlock()
	return true
}

// yield waits while the issuer is busy minting, until the deferral's
// max after queued at most.
func (w *recordWriter) yield(ctx context.Context, queued time.Time) {
	d := w.hold
	if d.busy == nil {
		return
	}
	deadline := queued.Add(d.max)
	for d.busy() && d.now().Before(deadline) {
		select {
		case <-ctx.Done():
			return
		case <-time.After(recordPoll):
		}
	}
}

// close lets the writes queued go out for up to drain, then stops the
// writers (a retry waiting for its backoff is not made: the record keeps
// the status it had, and the role its expiry).
func (w *recordWriter) close(drain time.Duration) {
	w.queue.ShutDown() // the workers take what is queued, then stop
	stopped := make(chan struct{})
	go func() {
		w.workers.Wait()
		close(stopped)
	}()
	select {
	case <-stopped:
	case <-time.After(drain):
		w.cancel()
		<-stopped
	}
	w.cancel()
}
