// Package keylock serialises work on one key while work on other keys
// runs in parallel: the lease manager's per-volume lock, and the
// revocation queue's per-lease order of writes.
//
// It imports none of our packages.
package keylock

import (
	"context"
	"sync"
)

// Keyed serialises work on one key while work on other keys runs in
// parallel. Waiting honours the caller's context. The zero value is ready
// to use.
type Keyed struct {
	mu      sync.Mutex
	entries map[string]*lockEntry
}

type lockEntry struct {
	ch   chan struct{}
	refs int
}

// Lock waits until key is free or ctx is done, and returns the key's
// unlock.
func (k *Keyed) Lock(ctx context.Context, key string) (unlock func(), err error) {
	k.mu.Lock()
	if k.entries == nil {
		k.entries = map[string]*lockEntry{}
	}
	e := k.entries[key]
	if e == nil {
		e = &lockEntry{ch: make(chan struct{}, 1)}
		k.entries[key] = e
	}
	e.refs++
	k.mu.Unlock()

	release := func() {
		k.mu.Lock()
		e.refs--
		if e.refs == 0 {
			delete(k.entries, key)
		}
		k.mu.Unlock()
	}
	select {
	case e.ch <- struct{}{}:
		return func() { <-e.ch; release() }, nil
	case <-ctx.Done():
		release()
		return nil, ctx.Err()
	}
}
