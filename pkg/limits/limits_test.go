package limits

import (
	"errors"
	"strings"
	"sync"
	"testing"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// volumes is a node's published volumes, by ID, with their namespace.
type volumes struct {
	mu   sync.Mutex
	byID map[string]string
}

func (v *volumes) Ready() bool { return true }
func (v *volumes) Published(id string) bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	_, ok := v.byID[id]
	return ok
}
func (v *volumes) Live(ns string) (int, int) {
	v.mu.Lock()
	defer v.mu.Unlock()
	n := 0
	for _, s := range v.byID {
		if s == ns {
			n++
		}
	}
	return n, len(v.byID)
}
func (v *volumes) publish(id, ns string) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.byID[id] = ns
}

func pod(ns string) provider.Pod { return provider.Pod{Namespace: ns, Name: "p"} }

func TestCapsPerNamespaceAndNode(t *testing.T) {
	vols := &volumes{byID: map[string]string{}}
	l := New(vols, Options{PerNamespace: 2, PerNode: 3})
	admit := func(id, ns string) error {
		done, err := l.Admit(id, pod(ns))
		if err == nil {
			vols.publish(id, ns)
			done()
		}
		return err
	}
	for _, id := range []string{"a1", "a2"} {
		if err := admit(id, "a"); err != nil {
			t.Fatal(err)
		}
	}
	err := admit("a3", "a")
	if !errors.Is(err, ErrLimited) || !strings.Contains(err.Error(), "--max-leases-per-namespace") {
		t.Fatalf("third in namespace a: %v", err)
	}
	if err := admit("a1", "a"); err != nil {
		t.Fatalf("a republish refused: %v", err)
	}
	if err := admit("b1", "b"); err != nil {
		t.Fatal(err)
	}
	if err := admit("c1", "c"); !errors.Is(err, ErrLimited) || !strings.Contains(err.Error(), "--max-leases-per-node") {
		t.Fatalf("fourth on the node: %v", err)
	}
}

// Publishes admitted together cannot pass a cap together: a slot is held
// from admission until the volume is published.
func TestConcurrentPublishesHoldTheirSlot(t *testing.T) {
	vols := &volumes{byID: map[string]string{}}
	l := New(vols, Options{PerNamespace: 5})
	var mu sync.Mutex
	var dones []func()
	var wg sync.WaitGroup
	admitted := 0
	for i := range 50 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			done, err := l.Admit(string(rune('A'+i)), pod("a"))
			if err == nil {
				mu.Lock()
				admitted++
				dones = append(dones, done)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if admitted != 5 {
		t.Fatalf("%d publishes admitted at once, cap 5", admitted)
	}
	for _, d := range dones {
		d()
		d() // idempotent
	}
	if done, err := l.Admit("next", pod("a")); err != nil {
		t.Fatalf("after the slots were released: %v", err)
	} else {
		done()
	}
}

func TestRatePerNamespace(t *testing.T) {
	vols := &volumes{byID: map[string]string{}}
	l := New(vols, Options{Rate: 0.001, Burst: 2}) // no refill within the test
	for i, want := range []error{nil, nil, ErrLimited} {
		done, err := l.Admit(string(rune('a'+i)), pod("a"))
		if !errors.Is(err, want) {
			t.Fatalf("publish %d: %v, want %v", i, err, want)
		}
		done()
	}
	if done, err := l.Admit("x", pod("b")); err != nil {
		t.Fatalf("another namespace limited: %v", err)
	} else {
		done()
	}
	vols.publish("a", "a")
	if _, err := l.Admit("a", pod("a")); err != nil {
		t.Fatalf("a republish limited: %v", err)
	}
}
