package lease

import (
	"context"
	"sync"
)

// keyedLock serialises work on one key (a volume ID) while work on other
// keys runs in parallel. Waiting honours the caller's context.
type keyedLock struct {
	mu      sync.Mutex
	entries map[string]*lockEntry
}

type lockEntry struct {
	ch   chan struct{}
	refs int
}

func (k *keyedLock) lock(ctx context.Context, key string) (unlock func(), err error) {
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
