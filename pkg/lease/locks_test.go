package lease

import (
	"testing"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// slowRecords is a store whose node records are written only once the
// test lets them; nothing else of it is called.
type slowRecords struct {
	Store
	writing, release chan struct{}
}

func (s slowRecords) WriteRecord(string, any) error {
	close(s.writing)
	<-s.release
	return nil
}

// The first-seen record is written under its own lock only: a slow write
// keeps no reader of the manager's state waiting (it was written under the
// manager-wide mutex, which Ready, State, Published and Live took too).
func TestFirstSeenWriteHoldsNoReader(t *testing.T) {
	s := slowRecords{writing: make(chan struct{}), release: make(chan struct{})}
	m := New(Options{Store: s})
	defer m.Close()
	first := make(chan bool, 1)
	go func() { first <- m.firstSeen(provider.Pod{Namespace: "ns", ServiceAccount: "sa"}, "class") }()
	<-s.writing
	read := make(chan struct{})
	go func() {
		m.Ready()
		m.State()
		m.Published("v")
		m.Live("ns")
		close(read)
	}()
	select {
	case <-read:
	case <-time.After(10 * time.Second): // a deadlock, not a slow read
		t.Error("readers of the manager's state waited for the first-seen record's write")
	}
	close(s.release)
	if !<-first {
		t.Error("the first request of an identity was not reported first")
	}
}
