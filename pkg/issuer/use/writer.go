package use

import (
	"context"
	"errors"
	"sync"
	"time"

	"k8s.io/klog/v2"

	"github.com/ephemeral-secrets/csi-driver/pkg/credential"
)

// writers is how many writes to the Recorder run at once: a burst of
// first uses (a Deployment's pods starting) is written in parallel, and
// sampling never waits for the API server.
const writers = 4

// writer writes usages to the Recorder off the sampling's path. A usage
// queued for a credential whose earlier one is not written yet replaces
// it: only the latest is written. One credential's writes never run at
// once: a newer usage waits for the write in flight, which could
// otherwise land last and take a source back out of the record.
type writer struct {
	rec Recorder

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

// newWriter starts the writers of rec (none when rec is nil).
func newWriter(rec Recorder) *writer {
	w := &writer{rec: rec, pending: map[string]write{}, inflight: map[string]bool{}}
	w.wake = sync.NewCond(&w.mu)
	w.ctx, w.stop = context.WithCancel(context.Background())
	if rec == nil {
		return w
	}
	for range writers {
		w.done.Add(1)
		go w.run()
	}
	return w
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
	timer := time.AfterFunc(d, w.stop)
	defer timer.Stop()
	w.done.Wait()
	w.stop()
}
