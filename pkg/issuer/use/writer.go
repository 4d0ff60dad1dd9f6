package use

import (
	"context"
	"errors"
	"sync"
	"time"

	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"
	"k8s.io/utils/clock"

	"github.com/ephemeral-secrets/csi-driver/pkg/credential"
)

// writers is how many writes to the Recorder run at once: a burst of
// first uses (a Deployment's pods starting) is written in parallel, and
// sampling never waits for the API server.
const writers = 4

// A pod's Warning of a foreign use that the Recorder failed to send is
// tried again, warnTries times in all, after warnBackoff, doubling up to
// warnMaxBackoff (1s, 2s, 4s, 8s: given up about 15s after the first).
const (
	warnTries      = 5
	warnBackoff    = time.Second
	warnMaxBackoff = 30 * time.Second
)

// writer writes usages to the Recorder off the sampling's path. A usage
// queued for a credential whose earlier one is not written yet replaces
// it: only the latest is written. One credential's writes never run at
// once: a newer usage waits for the write in flight, which could
// otherwise land last and take a source back out of the record.
//
// It also sends the pods' Warnings of foreign uses (UsedElsewhere), one
// at a time, trying a failed one again with backoff (warnTries in all).
type writer struct {
	rec Recorder
	// warns are the Warnings to send; warnRecs their credentials.
	warns    workqueue.TypedRateLimitingInterface[warning]
	warnRecs map[warning]credential.Record

	mu       sync.Mutex
	pending  map[string]write // by lease ID
	order    []string         // lease IDs, first queued first
	inflight map[string]bool  // lease IDs being written
	closed   bool
	wake     *sync.Cond
	stop     context.CancelFunc
	ctx      context.Context
	done     sync.WaitGroup
}

type write struct {
	rec credential.Record
	u   credential.Usage
}

// warning is one Warning to send: a credential used from addr, and the
// action taken. The same one queued twice before it is sent is sent once.
type warning struct {
	lease, addr, action string
}

// newWriter starts the writers of rec (none when rec is nil); clk times
// the Warnings' retries.
func newWriter(rec Recorder, clk clock.WithTicker) *writer {
	w := &writer{rec: rec, pending: map[string]write{}, inflight: map[string]bool{}, warnRecs: map[warning]credential.Record{}}
	w.wake = sync.NewCond(&w.mu)
	w.ctx, w.stop = context.WithCancel(context.Background())
	if rec == nil {
		return w
	}
	w.warns = workqueue.NewTypedRateLimitingQueueWithConfig(
		workqueue.NewTypedItemExponentialFailureRateLimiter[warning](warnBackoff, warnMaxBackoff),
		workqueue.TypedRateLimitingQueueConfig[warning]{Clock: clk})
	for range writers {
		w.done.Add(1)
		go w.run()
	}
	w.done.Add(1)
	go w.runWarnings()
	return w
}

// usedElsewhere queues the Warning that e's credential was used from
// addr, which none expected, and that the tracker did action.
func (w *writer) usedElsewhere(e credential.Record, addr, action string) {
	if w.rec == nil {
		return
	}
	k := warning{e.LeaseID, addr, action}
	w.mu.Lock()
	w.warnRecs[k] = e
	w.mu.Unlock()
	w.warns.Add(k)
}

// runWarnings sends the queued Warnings until the queue is shut down and
// empty (a retry still waiting for its backoff then is dropped).
func (w *writer) runWarnings() {
	defer w.done.Done()
	for {
		k, shutdown := w.warns.Get()
		if shutdown {
			return
		}
		w.warn(k)
		w.warns.Done(k)
	}
}

// warn sends one Warning, and queues it again, after its backoff, when
// it fails and has tries left.
func (w *writer) warn(k warning) {
	w.mu.Lock()
	e, ok := w.warnRecs[k]
	w.mu.Unlock()
	if !ok {
		w.warns.Forget(k)
		return // sent already (queued twice meanwhile)
	}
	ctx, cancel := context.WithTimeout(w.ctx, actionTimeout)
	err := w.rec.UsedElsewhere(ctx, e, k.addr, k.action)
	cancel()
	tries := w.warns.NumRequeues(k) + 1
	if err != nil && w.ctx.Err() == nil && tries < warnTries {
		klog.ErrorS(err, "Warning the pod of a foreign use of its credential; trying again", "lease", k.lease,
			"pod", e.Pod.Namespace+"/"+e.Pod.Name, "try", tries, "of", warnTries)
		w.warns.AddRateLimited(k)
		return
	}
	if err != nil {
		klog.ErrorS(err, "Warning the pod of a foreign use of its credential; giving up (the audit record and the metric hold it)",
			"lease", k.lease, "pod", e.Pod.Namespace+"/"+e.Pod.Name, "tries", tries)
	}
	w.warns.Forget(k)
	w.mu.Lock()
	delete(w.warnRecs, k)
	w.mu.Unlock()
}

// used queues u as e's usage.
func (w *writer) used(e credential.Record, u credential.Usage) {
	if w.rec == nil {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return
	}
	if _, queued := w.pending[e.LeaseID]; !queued {
		w.order = append(w.order, e.LeaseID)
	}
	w.pending[e.LeaseID] = write{e, u}
	w.wake.Signal()
}

func (w *writer) run() {
	defer w.done.Done()
	for {
		w.mu.Lock()
		i := w.next()
		for i < 0 && !(w.closed && len(w.order) == 0) {
			w.wake.Wait()
			i = w.next()
		}
		if i < 0 {
			w.mu.Unlock()
			return
		}
		lease := w.order[i]
		w.order = append(w.order[:i], w.order[i+1:]...)
		job := w.pending[lease]
		delete(w.pending, lease)
		w.inflight[lease] = true
		w.mu.Unlock()

		ctx, cancel := context.WithTimeout(w.ctx, actionTimeout)
		err := w.rec.Used(ctx, job.rec, job.u)
		cancel()
		if err != nil && !errors.Is(err, credential.ErrRecordGone) && w.ctx.Err() == nil {
			klog.ErrorS(err, "Recording a credential's use in its record", "lease", lease)
		}
		w.mu.Lock()
		delete(w.inflight, lease)
		w.wake.Broadcast() // a newer usage of lease may wait for it
		w.mu.Unlock()
	}
}

// next is the index in order of the first credential not being written,
// or -1. w.mu is held.
func (w *writer) next() int {
	for i, lease := range w.order {
		if !w.inflight[lease] {
			return i
		}
	}
	return -1
}

// close writes what is queued, for d at most, then stops the writers.
func (w *writer) close(d time.Duration) {
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return
	}
	w.closed = true
	w.wake.Broadcast()
	w.mu.Unlock()
	if w.warns != nil {
		w.warns.ShutDown()
	}
	timer := time.AfterFunc(d, w.stop)
	defer timer.Stop()
	w.done.Wait()
	w.stop()
}
