package inventory

import (
	"context"
	"sync"
	"time"

	"k8s.io/client-go/tools/cache"
)

// sightings tells when an informer has delivered a record this process
// created. Its cache then holds every Credential written before that
// record: one watch carries a resource's changes in the order they were
// written, and the cache applies each before its handlers hear of it. So
// a tombstone written before a mint's record is in the cache once the
// record is, and the mint's check needs no request of its own.
type sightings struct {
	mu      sync.Mutex
	waiting map[string]*sighting // by namespace/name
}

// sighting is closed once its record was seen.
type sighting struct {
	ch   chan struct{}
	seen bool
}

// seeWithin is how long a check waits for its record in the cache before
// it asks the API server instead.
const seeWithin = 2 * time.Second

// newSightings hears of every change inf delivers; nil without one.
func newSightings(inf cache.SharedIndexInformer) *sightings {
	if inf == nil {
		return nil
	}
	s := &sightings{waiting: map[string]*sighting{}}
	_, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    s.saw,
		UpdateFunc: func(_, obj any) { s.saw(obj) },
		DeleteFunc: s.saw,
	})
	if err != nil {
		return nil
	}
	return s
}

// expect notes that the record key is about to be created.
func (s *sightings) expect(key string) {
	if s == nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.waiting[key] = &sighting{ch: make(chan struct{})}
}

// forget stops expecting key.
func (s *sightings) forget(key string) {
	if s == nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.waiting, key)
}

// saw is the informer's handler: a change of an expected record is its
// sighting.
func (s *sightings) saw(obj any) {
	key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj)
	if err != nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if w, ok := s.waiting[key]; ok && !w.seen {
		w.seen = true
		close(w.ch)
	}
}

// seen waits for the sighting of key, expected, for seeWithin at most,
// and stops expecting it; false when it was not expected (not created by
// this process) or not seen in time.
func (s *sightings) seen(ctx context.Context, key string) bool {
	if s == nil {
		return false
	}
	defer s.forget(key)
	s.mu.Lock()
	w, ok := s.waiting[key]
	s.mu.Unlock()
	if !ok {
		return false
	}
	t := time.NewTimer(seeWithin)
	defer t.Stop()
	select {
	case <-w.ch:
		return true
	case <-t.C:
		return false
	case <-ctx.Done():
		return false
	}
}
