package use

import (
	"context"
	"sync"
	"testing"
	"time"

	"k8s.io/utils/clock"

	"github.com/ephemeral-secrets/csi-driver/pkg/credential"
)

// slowRecorder holds the first write of each credential until released,
// and notes whether two writes of one credential ever ran at once.
type slowRecorder struct {
	mu      sync.Mutex
	running map[string]int
	overlap bool
	last    map[string]int // sessions of the last usage written
	first   chan struct{}  // closed when the first write started
	release chan struct{}
	once    sync.Once
}

func (r *slowRecorder) Used(_ context.Context, e credential.Record, u credential.Usage) error {
	r.mu.Lock()
	r.running[e.LeaseID]++
	if r.running[e.LeaseID] > 1 {
		r.overlap = true
	}
	r.mu.Unlock()
	held := false
	r.once.Do(func() { held = true; close(r.first) })
	if held {
		<-r.release
	}
	r.mu.Lock()
	r.running[e.LeaseID]--
	r.last[e.LeaseID] = u.Sessions
	r.mu.Unlock()
	return nil
}

func (r *slowRecorder) UsedElsewhere(context.Context, credential.Record, string, string) error {
	return nil
}
func (r *slowRecorder) Withdraw(context.Context, credential.Record) error { return nil }

// A newer usage of a credential whose write is in flight waits for it,
// and is the one that lands last: run at once, the older write could land
// after it and take a source back out of the record.
func TestOneCredentialsWritesDoNotOverlap(t *testing.T) {
	r := &slowRecorder{running: map[string]int{}, last: map[string]int{}, first: make(chan struct{}), release: make(chan struct{})}
	w := newWriter(r, clock.RealClock{})
	e := credential.Record{LeaseID: "l1"}
	w.used(e, credential.Usage{Sessions: 1})
	<-r.first
	w.used(e, credential.Usage{Sessions: 2})                                // queued while the first is in flight
	w.used(credential.Record{LeaseID: "l2"}, credential.Usage{Sessions: 7}) // another credential is not held up
	deadline := time.Now().Add(5 * time.Second)
	for {
		r.mu.Lock()
		l2 := r.last["l2"]
		r.mu.Unlock()
		if l2 == 7 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("another credential's write waited for l1's")
		}
		time.Sleep(5 * time.Millisecond)
	}
	time.Sleep(50 * time.Millisecond) // a free writer would take l1's second usage now
	close(r.release)
	w.close(5 * time.Second)
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.overlap {
		t.Error("two writes of one credential ran at once")
	}
	if r.last["l1"] != 2 {
		t.Errorf("the usage written last has %d sessions, want the newer (2)", r.last["l1"])
	}
}
