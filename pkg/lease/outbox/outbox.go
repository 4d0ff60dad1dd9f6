// Package outbox is the lease manager's records outbox: the calls that
// record each lease outside the node (the cluster's inventory), made by a
// bounded pool of workers of their own (one volume's calls in order, other
// volumes' in parallel), never under a volume's lock, and retried with a
// backoff until they succeed. A failure never fails a publish or
// holds a revocation back. It imports pkg/credential (the record it
// sends) and pkg/metrics, nothing of the lease manager's.
package outbox

import (
	"cmp"
	"context"
	"errors"
	"slices"
	"sync"
	"time"

	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"
	"k8s.io/utils/clock"

	"github.com/ephemeral-secrets/csi-driver/pkg/credential"
	"github.com/ephemeral-secrets/csi-driver/pkg/metrics"
)

// Records keeps a record of each credential outside the node (the
// cluster's inventory).
type Records interface {
	// Issued records that the backend holds r until r.ExpiresAt (after an
	// issue, a rotation, a task's issue or a renewal). An error wrapping
	// credential.ErrRecordGone withdraws the volume.
	Issued(ctx context.Context, r credential.Record) error
	// Revoked records that r is revoked (or, where the backend cannot
	// revoke it, expired): its record may go. A record gone is no error.
	Revoked(ctx context.Context, r credential.Record) error
}

// Options configure an Outbox. Zero values take the defaults.
type Options struct {
	Records Records
	Metrics *metrics.Metrics
	// RetryMin and RetryMax bound the backoff of a failed call (defaults
	// 1 s and 1 min); Timeout bounds one call (default 30 s).
	RetryMin, RetryMax, Timeout time.Duration
	// Gone is told, in a goroutine of its own, of a lease whose record was
	// deleted as it was recorded.
	Gone func(credential.Record)
	// Clock times the retries (default: the system's).
	Clock clock.WithTicker
	// Workers is how many calls are made at once, each of another volume
	// (default 8): a burst of publishes is recorded in parallel.
	Workers int
}

// Outbox holds the Records calls not yet made, one per lease: the latest
// state of each wins, and a revocation is final.
type Outbox struct {
	opts    Options
	backoff workqueue.TypedRateLimiter[string]
	wake    chan struct{}

	mu      sync.Mutex
	pending map[string]*call // lease ID ->
	seq     uint64
}

type call struct {
	rec     credential.Record
	revoked bool
	at      time.Time // not before
	seq     uint64    // calls are made in the order they were noted
}

// New returns an empty Outbox.
func New(opts Options) *Outbox {
	if opts.RetryMin <= 0 {
		opts.RetryMin = time.Second
	}
	if opts.RetryMax <= 0 {
		opts.RetryMax = time.Minute
	}
	if opts.Timeout <= 0 {
		opts.Timeout = 30 * time.Second
	}
	if opts.Clock == nil {
		opts.Clock = clock.RealClock{}
	}
	if opts.Workers <= 0 {
		opts.Workers = 8
	}
	return &Outbox{
		opts: opts, wake: make(chan struct{}, 1), pending: map[string]*call{},
		backoff: workqueue.NewTypedItemExponentialFailureRateLimiter[string](opts.RetryMin, opts.RetryMax),
	}
}

// Issued queues the record of a lease issued, rotated in or renewed.
func (o *Outbox) Issued(rec credential.Record) { o.note(rec, false, time.Time{}) }

// Revoked queues the release of the record of a lease whose revocation
// the backend confirmed, not before at (zero: at once).
func (o *Outbox) Revoked(rec credential.Record, at time.Time) { o.note(rec, true, at) }

func (o *Outbox) note(rec credential.Record, revoked bool, at time.Time) {
	if o.opts.Records == nil || rec.LeaseID == "" {
		return
	}
	o.mu.Lock()
	cur := o.pending[rec.LeaseID]
	// Once revoked, an issue or a renewal noted late changes nothing.
	if cur == nil || !cur.revoked || revoked {
		o.seq++
		o.pending[rec.LeaseID] = &call{rec: rec, revoked: revoked, at: at, seq: o.seq}
	}
	o.mu.Unlock()
	select {
	case o.wake <- struct{}{}:
	default:
	}
}

// Run makes the queued calls until ctx is done.
func (o *Outbox) Run(ctx context.Context) {
	if o.opts.Records == nil {
		return
	}
	t := o.opts.Clock.NewTimer(o.Flush(ctx))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-o.wake:
		case <-t.C():
		}
		d := o.Flush(ctx)
		if !t.Stop() {
			select {
			case <-t.C():
			default:
			}
		}
		t.Reset(d)
	}
}

// Flush makes every due call once and returns how long until the next one
// is due. The calls of one volume are made one after another in the order
// they were noted (a rotation's new lease is recorded before the old one
// is released); those of up to Workers volumes at once.
func (o *Outbox) Flush(ctx context.Context) time.Duration {
	now := o.opts.Clock.Now()
	var due []*call
	wait := time.Hour
	o.mu.Lock()
	for _, c := range o.pending {
		if now.Before(c.at) {
			wait = min(wait, c.at.Sub(now))
			continue
		}
		due = append(due, c)
	}
	o.mu.Unlock()
	slices.SortFunc(due, func(a, b *call) int { return cmp.Compare(a.seq, b.seq) })
	var order []string // volumes, by their first due call
	byVolume := map[string][]*call{}
	for _, c := range due {
		k := c.rec.VolumeID
		if k == "" {
			k = "lease/" + c.rec.LeaseID
		}
		if byVolume[k] == nil {
			order = append(order, k)
		}
		byVolume[k] = append(byVolume[k], c)
	}
	var (
		wg   sync.WaitGroup
		wmu  sync.Mutex
		slot = make(chan struct{}, o.opts.Workers)
	)
	for _, k := range order {
		select {
		case slot <- struct{}{}:
		case <-ctx.Done():
		}
		if ctx.Err() != nil {
			break
		}
		wg.Go(func() {
			defer func() { <-slot }()
			for _, c := range byVolume[k] {
				if ctx.Err() != nil {
					return
				}
				if d, retry := o.make(ctx, c); retry {
					wmu.Lock()
					wait = min(wait, d)
					wmu.Unlock()
				}
			}
		})
	}
	wg.Wait()
	if ctx.Err() != nil {
		return 0
	}
	return wait
}

// make makes c's call and reports whether it stays queued, and then the
// delay before its next attempt.
func (o *Outbox) make(ctx context.Context, c *call) (time.Duration, bool) {
	cctx, cancel := context.WithTimeout(ctx, o.opts.Timeout)
	var err error
	if c.revoked {
		err = o.opts.Records.Revoked(cctx, c.rec)
	} else {
		err = o.opts.Records.Issued(cctx, c.rec)
	}
	cancel()
	gone := errors.Is(err, credential.ErrRecordGone)
	var d time.Duration
	o.mu.Lock()
	current := o.pending[c.rec.LeaseID] == c // not replaced meanwhile
	switch {
	case !current:
	case err == nil || gone:
		delete(o.pending, c.rec.LeaseID)
		o.backoff.Forget(c.rec.LeaseID)
	default:
		d = o.backoff.When(c.rec.LeaseID)
		c.at = o.opts.Clock.Now().Add(d)
	}
	o.mu.Unlock()
	// Failures only are counted: Records may pass over a provider it does
	// not record (postgres, which the issuer records).
	switch {
	case err == nil:
	case gone:
		klog.InfoS("The credential's record was deleted as it was recorded; withdrawing the volume",
			"volumeID", c.rec.VolumeID, "leaseID", c.rec.LeaseID)
		if o.opts.Gone != nil {
			go o.opts.Gone(c.rec)
		}
	default:
		o.opts.Metrics.LeaseOp(c.rec.Provider, metrics.OpRecord, metrics.Error)
		klog.ErrorS(err, "Recording a credential in the inventory failed; will retry",
			"leaseID", c.rec.LeaseID, "volumeID", c.rec.VolumeID, "call", callName(c.revoked), "retryIn", d)
	}
	return d, current && err != nil && !gone
}

func callName(revoked bool) string {
	if revoked {
		return "revoked"
	}
	return "issued"
}
