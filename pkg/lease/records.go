package lease

import (
	"cmp"
	"context"
	"errors"
	"slices"
	"sync"
	"time"

	"k8s.io/klog/v2"

	"github.com/ephemeral-secrets/csi-driver/pkg/metrics"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/storage"
)

// ErrRecordGone is what Records.Issued returns (wrapped) when the record
// of the lease was deleted, or is being deleted (the kill switch raced
// the issue or a renewal): the manager then withdraws the volume.
var ErrRecordGone = errors.New("the credential's record was deleted")

// Records keeps a record of each credential outside the node (the
// cluster's inventory). The manager tells it when a lease is issued or
// renewed, and when the backend confirmed its revocation. Its calls are
// made from one goroutine, never under a volume's lock; a failure never
// fails a publish or holds a revocation back: it is logged, counted and
// retried with the revocation backoff.
type Records interface {
	// Issued records that the backend holds r until r.ExpiresAt (after an
	// issue, a rotation, a task's issue or a renewal). An error wrapping
	// ErrRecordGone withdraws the volume.
	Issued(ctx context.Context, r Record) error
	// Revoked records that r is revoked (or, where the backend cannot
	// revoke it, expired): its record may go. A record gone is no error.
	Revoked(ctx context.Context, r Record) error
}

// Record describes one lease for Records: nothing secret.
type Record struct {
	LeaseID   string
	VolumeID  string
	Pod       provider.Pod
	Class     string
	Provider  string
	Role      string
	Task      string // a task lease of the volume's
	IssuedAt  time.Time
	ExpiresAt time.Time
}

func recordOf(meta storage.Metadata, l provider.Lease) Record {
	return Record{
		LeaseID: l.ID, VolumeID: meta.VolumeID, Pod: meta.Pod, Class: meta.Class, Provider: meta.Provider,
		Role: l.Role, Task: taskOf(meta, l.ID), IssuedAt: l.IssuedAt, ExpiresAt: l.ExpiresAt,
	}
}

// recordQueue holds the Records calls not yet made, one per lease: the
// latest state of each wins, and a revocation is final.
type recordQueue struct {
	mu      sync.Mutex
	pending map[string]*recordCall // lease ID ->
	seq     uint64
	wake    chan struct{}
}

type recordCall struct {
	rec      Record
	revoked  bool
	at       time.Time // not before
	attempts int
	seq      uint64 // calls are made in the order they were noted
}

// noteIssued queues the record of l, v's lease (or one of its tasks').
func (m *Manager) noteIssued(meta storage.Metadata, l provider.Lease) {
	m.noteRecord(recordOf(meta, l), false, time.Time{})
}

// noteRevoked queues the release of the record of a lease whose
// revocation the backend confirmed. One the backend cannot revoke (an STS
// session) lives until it expires, and so does its record: the inventory
// shows what is alive, and deleting the record then (the kill switch)
// could stop nothing anyway.
func (m *Manager) noteRevoked(r storage.Revocation, unrevocable bool) {
	rec := Record{
		LeaseID: r.Lease.ID, VolumeID: r.VolumeID, Pod: r.Pod, Class: r.Class, Provider: r.Lease.Provider,
		Role: r.Lease.Role, Task: r.Task, IssuedAt: r.Lease.IssuedAt, ExpiresAt: r.Lease.ExpiresAt,
	}
	var at time.Time
	if unrevocable {
		at = r.Lease.ExpiresAt
	}
	m.noteRecord(rec, true, at)
}

func (m *Manager) noteRecord(rec Record, revoked bool, at time.Time) {
	if m.opts.Records == nil || rec.LeaseID == "" {
		return
	}
	q := &m.records
	q.mu.Lock()
	cur := q.pending[rec.LeaseID]
	// Once revoked, an issue or a renewal noted late changes nothing.
	if cur == nil || !cur.revoked || revoked {
		q.seq++
		q.pending[rec.LeaseID] = &recordCall{rec: rec, revoked: revoked, at: at, seq: q.seq}
	}
	q.mu.Unlock()
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

// runRecords makes the queued Records calls until ctx is done.
func (m *Manager) runRecords(ctx context.Context) {
	if m.opts.Records == nil {
		return
	}
	q := &m.records
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-m.ctx.Done():
			return
		case <-q.wake:
		case <-t.C:
		}
		rearm(t, m.drainRecords(ctx))
	}
}

// drainRecords makes every due call once and returns how long until the
// next one is due.
func (m *Manager) drainRecords(ctx context.Context) time.Duration {
	q := &m.records
	now := time.Now()
	var due []*recordCall
	wait := time.Hour
	q.mu.Lock()
	for _, c := range q.pending {
		if now.Before(c.at) {
			wait = min(wait, c.at.Sub(now))
			continue
		}
		due = append(due, c)
	}
	q.mu.Unlock()
	// A rotation's new lease recorded before the old one is released.
	slices.SortFunc(due, func(a, b *recordCall) int { return cmp.Compare(a.seq, b.seq) })
	for _, c := range due {
		if ctx.Err() != nil {
			return 0
		}
		cctx, cancel := context.WithTimeout(ctx, m.opts.BackendTimeout)
		var err error
		if c.revoked {
			err = m.opts.Records.Revoked(cctx, c.rec)
		} else {
			err = m.opts.Records.Issued(cctx, c.rec)
		}
		cancel()
		gone := errors.Is(err, ErrRecordGone)
		q.mu.Lock()
		if q.pending[c.rec.LeaseID] == c { // not replaced meanwhile
			if err == nil || gone {
				delete(q.pending, c.rec.LeaseID)
			} else {
				c.attempts++
				d := m.backoff(c.attempts)
				c.at = time.Now().Add(d)
				wait = min(wait, d)
			}
		}
		q.mu.Unlock()
		// Failures only are counted: Records may pass over a provider it
		// does not record (postgres, which the issuer records).
		switch {
		case err == nil:
		case gone:
			klog.InfoS("The credential's record was deleted as it was recorded; withdrawing the volume",
				"volumeID", c.rec.VolumeID, "leaseID", c.rec.LeaseID)
			go m.withdrawGone(c.rec)
		default:
			m.opts.Metrics.LeaseOp(c.rec.Provider, metrics.OpRecord, metrics.Error)
			klog.ErrorS(err, "Recording a credential in the inventory failed; will retry",
				"leaseID", c.rec.LeaseID, "volumeID", c.rec.VolumeID, "call", callName(c.revoked), "attempt", c.attempts)
		}
	}
	return wait
}

func callName(revoked bool) string {
	if revoked {
		return "revoked"
	}
	return "issued"
}

// withdrawGone withdraws the volume of a lease whose record was deleted,
// retrying while the manager is not ready or the volume busy.
func (m *Manager) withdrawGone(rec Record) {
	for attempt := 1; m.ctx.Err() == nil; attempt++ {
		_, err := m.Withdraw(m.ctx, rec.VolumeID, "killed: credential record of lease "+rec.LeaseID+" deleted")
		if err == nil || errors.Is(err, ErrUnknownVolume) {
			return
		}
		klog.ErrorS(err, "Withdrawing a volume whose credential record was deleted; will retry", "volumeID", rec.VolumeID)
		select {
		case <-time.After(m.backoff(attempt)):
		case <-m.ctx.Done():
		}
	}
}
