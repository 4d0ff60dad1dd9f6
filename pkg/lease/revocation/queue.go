// Package revocation is the node's durable revocation queue: every lease
// whose revocation was asked for stays in it, on the store, until its
// backend confirmed (or said it cannot revoke it), across failures and
// restarts. The lease manager (pkg/lease) adds to it and waits on it; the
// queue calls the providers. It owns the shape of its entries (Entry);
// the store keeps them opaque. It imports pkg/provider, pkg/credential
// (the record of what an entry revokes), pkg/audit,
// pkg/metrics and pkg/lease/keylock, nothing of the lease manager's and
// not pkg/storage.
//
// The queue keeps an index of its entries in memory, read from the store
// once (Load, at recovery), and writes the store before the index changes:
// an entry is written before the revocation is tried, and removed only
// once the backend answered. Due entries go through client-go's delaying
// workqueue, keyed by lease ID: a not-before time (a rotated-out lease's
// grace) and the backoff after a failure are delays of that queue, and a
// bounded pool of workers revokes what is due, in parallel.
package revocation

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"
	"k8s.io/utils/clock"

	"github.com/ephemeral-secrets/csi-driver/pkg/audit"
	"github.com/ephemeral-secrets/csi-driver/pkg/lease/keylock"
	"github.com/ephemeral-secrets/csi-driver/pkg/metrics"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

var (
	// ErrUnknownProvider: the entry names a provider this driver lacks; it
	// stays queued (a configuration that brings the provider back revokes it).
	ErrUnknownProvider = errors.New("unknown provider")
	// ErrClosed: the queue stopped before the backend confirmed; the entry
	// stays on the store and the next start finishes it.
	ErrClosed = errors.New("the driver stopped before the backend confirmed the revocation")
)

// Store is what the queue needs of the storage: its own entries.
// pkg/lease adapts the volume store to it.
type Store interface {
	ListRevocations() ([]Entry, error)
	PutRevocation(r Entry) error
	DeleteRevocation(leaseID string) error
}

// Providers finds the provider that revokes a lease.
type Providers interface {
	Get(name string) (provider.Provider, bool)
}

// Options configure a Queue. Zero values take the defaults.
type Options struct {
	Store     Store
	Providers Providers
	Audit     *audit.Logger
	Metrics   *metrics.Metrics
	// Workers is how many revocations run at once (default 8).
	Workers int
	// RetryMin and RetryMax bound the backoff of a failed revocation: it
	// doubles from RetryMin with each failure, up to RetryMax (defaults 1 s
	// and 1 min).
	RetryMin, RetryMax time.Duration
	// BackendTimeout bounds one call to a provider (default 30 s).
	BackendTimeout time.Duration
	// Clock times not-before, backoff and ages (default: the system's).
	Clock clock.WithTicker
	// Revoked, if set, is told of each revocation the backend answered
	// for: revoked, or (unrevocable) it cannot revoke the lease, which then
	// lives to its expiry. It is called from a worker, under no lock.
	Revoked func(r Entry, unrevocable bool)
}

// Queue is the durable revocation queue. Its methods are safe to call
// from any goroutine.
type Queue struct {
	opts    Options
	clock   clock.WithTicker
	backoff workqueue.TypedRateLimiter[string]
	// writing orders the store's writes of each lease: they are made
	// under the lease's own lock, never under mu, and the index changes
	// after the store, under both.
	writing keylock.Keyed

	mu sync.Mutex // guards what follows
	// due holds the lease IDs to try, each at its time; a Run that ends
	// shuts it down, and the next Run starts another.
	due      workqueue.TypedDelayingInterface[string]
	closed   bool                       // by Close: no Run starts again
	entries  map[string]*entry          // lease ID ->
	byVolume map[string]map[string]bool // volume ID -> lease IDs queued
	waiters  map[string]*waiter         // lease ID -> who waits for its backend's answer
}

// entry is one queued revocation.
type entry struct {
	rev Entry
	// at: not to be tried before (its not-before time, or its backoff).
	at time.Time
	// gen counts the Adds of the lease: one re-added while it was being
	// revoked is revoked again, with what the later Add holds.
	gen  uint64
	busy bool // being revoked
}

// waiter is closed when the backend answered for a lease's revocation.
type waiter struct {
	done chan struct{}
	err  error // set before done is closed
}

// New returns an empty Queue; Load fills it from the store.
func New(opts Options) *Queue {
	if opts.Workers <= 0 {
		opts.Workers = 8
	}
	if opts.RetryMin <= 0 {
		opts.RetryMin = time.Second
	}
	if opts.RetryMax <= 0 {
		opts.RetryMax = time.Minute
	}
	if opts.BackendTimeout <= 0 {
		opts.BackendTimeout = 30 * time.Second
	}
	if opts.Clock == nil {
		opts.Clock = clock.RealClock{}
	}
	return &Queue{
		opts: opts, clock: opts.Clock, due: newDue(opts.Clock),
		backoff: workqueue.NewTypedItemExponentialFailureRateLimiter[string](opts.RetryMin, opts.RetryMax),
		entries: map[string]*entry{}, byVolume: map[string]map[string]bool{}, waiters: map[string]*waiter{},
	}
}

// Load reads the store's entries into the index and schedules them. Call
// it once, at recovery, before anything reads the queue; an entry already
// in the index (added since) is kept as it is.
func (q *Queue) Load() error {
	q.mu.Lock()
	defer q.mu.Unlock()
	revs, err := q.opts.Store.ListRevocations()
	if err != nil {
		return fmt.Errorf("reading the revocation queue: %w", err)
	}
	for _, r := range revs {
		if _, ok := q.entries[r.Lease.ID]; !ok {
			q.index(&entry{rev: r, at: r.NotBefore})
		}
	}
	return nil
}

// lockWrites takes lease id's lock over the store's writes of its entry.
func (q *Queue) lockWrites(id string) (unlock func()) {
	unlock, _ = q.writing.Lock(context.Background(), id) // no deadline: never fails
	return unlock
}

// index puts e in the index and schedules it; under mu.
func (q *Queue) index(e *entry) {
	id := e.rev.Lease.ID
	q.entries[id] = e
	vol := q.byVolume[e.rev.VolumeID]
	if vol == nil {
		vol = map[string]bool{}
		q.byVolume[e.rev.VolumeID] = vol
	}
	vol[id] = true
	q.schedule(id, e.at)
}

// unindex removes lease id from the index; under mu.
func (q *Queue) unindex(id string) {
	e := q.entries[id]
	if e == nil {
		return
	}
	delete(q.entries, id)
	if vol := q.byVolume[e.rev.VolumeID]; vol != nil {
		delete(vol, id)
		if len(vol) == 0 {
			delete(q.byVolume, e.rev.VolumeID)
		}
	}
}

// schedule makes lease id due at at (now if zero or past).
func (q *Queue) schedule(id string, at time.Time) {
	q.due.AddAfter(id, at.Sub(q.clock.Now()))
}

// Add records r durably, then queues it: it is tried at r.NotBefore (at
// once if zero), and until its backend answers. Adding a queued lease
// again replaces its entry. EnqueuedAt is stamped if zero.
func (q *Queue) Add(r Entry) error {
	if r.Lease.ID == "" {
		return nil
	}
	if r.EnqueuedAt.IsZero() {
		r.EnqueuedAt = q.clock.Now().UTC()
	}
	unlock := q.lockWrites(r.Lease.ID)
	defer unlock()
	if err := q.opts.Store.PutRevocation(r); err != nil {
		return err
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	e := q.entries[r.Lease.ID]
	if e == nil {
		q.index(&entry{rev: r, at: r.NotBefore, gen: 1})
		return nil
	}
	e.rev, e.at, e.gen = r, r.NotBefore, e.gen+1
	q.schedule(r.Lease.ID, e.at)
	return nil
}

// Expedite makes the revocations of a volume that wait out a not-before
// time (a rotated-out lease's grace) due now: the volume is going, and
// nobody reads its old files. It reports how many it made due.
func (q *Queue) Expedite(volumeID string) int {
	now := q.clock.Now()
	q.mu.Lock()
	var graced []string
	for id := range q.byVolume[volumeID] {
		if q.entries[id].rev.NotBefore.After(now) {
			graced = append(graced, id)
		}
	}
	q.mu.Unlock()
	n := 0
	for _, id := range graced {
		if q.expedite(id, now) {
			n++
		}
	}
	return n
}

// expedite makes lease id due now if it waits out a not-before time.
func (q *Queue) expedite(id string, now time.Time) bool {
	unlock := q.lockWrites(id)
	defer unlock()
	q.mu.Lock()
	e := q.entries[id]
	if e == nil || !e.rev.NotBefore.After(now) {
		q.mu.Unlock()
		return false
	}
	r := e.rev // as it is on the store: it changes only under id's lock
	q.mu.Unlock()
	r.NotBefore = time.Time{}
	if err := q.opts.Store.PutRevocation(r); err != nil {
		klog.ErrorS(err, "Making a rotated-out lease's revocation due", "leaseID", id)
		return false
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	e.rev.NotBefore, e.at = time.Time{}, time.Time{}
	q.schedule(id, e.at)
	return true
}

// Queued reports whether the revocation of lease id is queued.
func (q *Queue) Queued(id string) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.entries[id] != nil
}

// Len is the number of revocations not yet confirmed.
func (q *Queue) Len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.entries)
}

// Oldest is when the oldest queued revocation was queued (zero with none).
func (q *Queue) Oldest() time.Time {
	q.mu.Lock()
	defer q.mu.Unlock()
	var oldest time.Time
	for _, e := range q.entries {
		if oldest.IsZero() || e.rev.EnqueuedAt.Before(oldest) {
			oldest = e.rev.EnqueuedAt
		}
	}
	return oldest
}

func newDue(c clock.WithTicker) workqueue.TypedDelayingInterface[string] {
	return workqueue.NewTypedDelayingQueueWithConfig(workqueue.TypedDelayingQueueConfig[string]{Clock: c})
}

// Run revokes due entries with Workers workers until ctx is done or the
// queue is closed. What is left stays queued, on the store and in the
// index, for a later Run or the next start.
func (q *Queue) Run(ctx context.Context) {
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return
	}
	if q.due.ShuttingDown() { // an earlier Run ended
		q.due = newDue(q.clock)
		for id, e := range q.entries {
			q.schedule(id, e.at)
		}
	}
	due := q.due
	q.mu.Unlock()
	var wg sync.WaitGroup
	for range q.opts.Workers {
		wg.Go(func() {
			for {
				id, shutdown := due.Get()
				if shutdown {
					return
				}
				q.attempt(ctx, id)
				due.Done(id)
			}
		})
	}
	stop := context.AfterFunc(ctx, due.ShutDown)
	defer stop()
	wg.Wait()
}

// Close stops the queue's timers and workers for good; its entries stay
// on the store.
func (q *Queue) Close() {
	q.mu.Lock()
	q.closed = true
	due := q.due
	q.mu.Unlock()
	due.ShutDown()
}

// RevokeDue tries every entry due now once, one after the other in the
// caller's goroutine, beside the workers if they run.
func (q *Queue) RevokeDue(ctx context.Context) {
	now := q.clock.Now()
	q.mu.Lock()
	var due []string
	for id, e := range q.entries {
		if !e.busy && !now.Before(e.at) {
			due = append(due, id)
		}
	}
	q.mu.Unlock()
	for _, id := range due {
		q.attempt(ctx, id)
	}
}

// attempt asks the backend to revoke lease id if it is queued, due and
// not being revoked already, and records the answer.
func (q *Queue) attempt(ctx context.Context, id string) {
	if ctx.Err() != nil {
		return
	}
	now := q.clock.Now()
	q.mu.Lock()
	e := q.entries[id]
	if e == nil || e.busy {
		q.mu.Unlock()
		return
	}
	if now.Before(e.at) { // re-added with a later time meanwhile
		q.schedule(id, e.at)
		q.mu.Unlock()
		return
	}
	e.busy = true
	r, gen := e.rev, e.gen
	q.mu.Unlock()

	err := q.revoke(ctx, r)
	switch {
	case err == nil, errors.Is(err, provider.ErrNotRevocable):
		q.finish(r, gen, err)
	case ctx.Err() != nil: // stopping: not the backend's failure
		q.mu.Lock()
		e.busy = false
		q.mu.Unlock()
	default:
		q.fail(r, gen, err)
	}
}

// revoke calls r's provider.
func (q *Queue) revoke(ctx context.Context, r Entry) error {
	prov, ok := q.opts.Providers.Get(r.Lease.Provider)
	if !ok {
		return fmt.Errorf("%w: %s", ErrUnknownProvider, r.Lease.Provider)
	}
	cctx, cancel := context.WithTimeout(ctx, q.opts.BackendTimeout)
	defer cancel()
	return prov.Revoke(cctx, r.Lease)
}

// finish removes r, which the backend answered for (err: it cannot
// revoke it), and tells who waits. A lease added again while it was
// revoked stays queued and is revoked again.
func (q *Queue) finish(r Entry, gen uint64, err error) {
	id := r.Lease.ID
	q.backoff.Forget(id)
	func() {
		unlock := q.lockWrites(id)
		defer unlock()
		q.mu.Lock()
		e := q.entries[id]
		if e.gen != gen { // added again meanwhile: revoked again
			e.busy = false
			q.schedule(id, e.at)
			q.mu.Unlock()
			return
		}
		q.mu.Unlock() // busy still: no worker takes it up meanwhile
		if derr := q.opts.Store.DeleteRevocation(id); derr != nil {
			// The backend answered: the next start revokes it again, harmlessly.
			klog.ErrorS(derr, "Removing a finished revocation from the queue", "leaseID", id)
		}
		q.mu.Lock()
		defer q.mu.Unlock()
		q.unindex(id)
		if w := q.waiters[id]; w != nil && !closed(w.done) {
			w.err = err
			close(w.done) // kept until Await took the answer
		}
	}()
	outcome := audit.Success
	if err != nil {
		outcome = audit.Unrevocable
	}
	if q.opts.Revoked != nil {
		q.opts.Revoked(r, err != nil)
	}
	q.audit(r, audit.Revoke, outcome, nil)
	q.opts.Metrics.LeaseOp(r.Lease.Provider, metrics.OpRevoke, outcome)
	klog.V(2).InfoS("Revoked lease", "leaseID", id, "volumeID", r.VolumeID, "outcome", outcome)
}

// fail records a failed attempt at r and schedules the next after the
// backoff.
func (q *Queue) fail(r Entry, gen uint64, err error) {
	id := r.Lease.ID
	d := q.backoff.When(id)
	func() {
		unlock := q.lockWrites(id)
		defer unlock()
		q.mu.Lock()
		e := q.entries[id]
		e.busy = false
		if e.gen != gen { // added again meanwhile: tried as that Add says
			q.schedule(id, e.at)
			q.mu.Unlock()
			return
		}
		e.rev.Attempts++
		e.rev.LastError = err.Error()
		e.at = q.clock.Now().Add(d)
		q.schedule(id, e.at)
		stored := e.rev
		q.mu.Unlock()
		r.Attempts = stored.Attempts
		if perr := q.opts.Store.PutRevocation(stored); perr != nil {
			klog.ErrorS(perr, "Updating the revocation queue", "leaseID", id)
		}
	}()
	q.audit(r, audit.Failure, audit.Error, err)
	q.opts.Metrics.LeaseOp(r.Lease.Provider, metrics.OpRevoke, metrics.Error)
	klog.ErrorS(err, "Revocation failed; will retry", "leaseID", id, "attempt", r.Attempts, "retryIn", d)
}

// audit writes the record of an attempt at r: its stage, outcome and
// error (nil: none).
func (q *Queue) audit(r Entry, stage audit.Stage, outcome string, err error) {
	rec := audit.Of(r.Credential())
	rec.Stage, rec.Outcome, rec.Detail = stage, outcome, r.Reason
	if !r.Lease.IssuedAt.IsZero() {
		rec.Lifetime = q.clock.Since(r.Lease.IssuedAt).Round(time.Millisecond).String()
	}
	if err != nil {
		rec.Error = err.Error()
	}
	if outcome == audit.Unrevocable {
		rec.Detail = r.Reason + "; the backend cannot revoke it: it stays valid until expires_at"
	}
	if werr := q.opts.Audit.Log(rec); werr != nil {
		klog.ErrorS(werr, "Writing audit record")
	}
}

// Watch registers interest in the backend's answer for the revocation of
// ids; call it before adding them (a worker may answer at once).
func (q *Queue) Watch(ids []string) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for _, id := range ids {
		if _, ok := q.waiters[id]; !ok {
			q.waiters[id] = &waiter{done: make(chan struct{})}
		}
	}
}

// WatchVolume registers interest in every revocation of volumeID still
// queued, and returns their lease IDs.
func (q *Queue) WatchVolume(volumeID string) []string {
	q.mu.Lock()
	defer q.mu.Unlock()
	ids := make([]string, 0, len(q.byVolume[volumeID]))
	for id := range q.byVolume[volumeID] {
		ids = append(ids, id)
		if _, ok := q.waiters[id]; !ok {
			q.waiters[id] = &waiter{done: make(chan struct{})}
		}
	}
	return ids
}

// Unwatch drops interest in ids.
func (q *Queue) Unwatch(ids []string) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for _, id := range ids {
		delete(q.waiters, id)
	}
}

// Await returns a channel that receives one value once the backend
// answered for every one of ids that is watched (and ends their watch): nil when it revoked
// them, an error wrapping provider.ErrNotRevocable when it cannot revoke
// one, ErrClosed if stop is closed first.
func (q *Queue) Await(stop <-chan struct{}, ids []string) <-chan error {
	out := make(chan error, 1)
	q.mu.Lock()
	ws := make([]*waiter, 0, len(ids))
	for _, id := range ids {
		w, ok := q.waiters[id]
		if !ok {
			continue
		}
		if q.entries[id] == nil && !closed(w.done) {
			delete(q.waiters, id) // never queued (its Add failed): nothing to wait for
			continue
		}
		ws = append(ws, w)
	}
	q.mu.Unlock()
	go func() {
		defer q.Unwatch(ids)
		var first error
		for _, w := range ws {
			select {
			case <-w.done:
				if first == nil && w.err != nil {
					first = fmt.Errorf("the backend cannot revoke it; it stays valid until it expires: %w", w.err)
				}
			case <-stop:
				out <- ErrClosed
				return
			}
		}
		out <- first
	}()
	return out
}

func closed(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}
