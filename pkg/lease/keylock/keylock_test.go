package keylock

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestKeyedLockSerialisesOneKeyOnly(t *testing.T) {
	var k Keyed
	ctx := context.Background()
	var inA, maxA atomic.Int32
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			unlock, err := k.Lock(ctx, "a")
			if err != nil {
				t.Error(err)
				return
			}
			n := inA.Add(1)
			for {
				m := maxA.Load()
				if n <= m || maxA.CompareAndSwap(m, n) {
					break
				}
			}
			time.Sleep(time.Millisecond)
			inA.Add(-1)
			unlock()
		})
	}
	// Another key is not held up by "a".
	unlockA, _ := k.Lock(ctx, "a-held")
	unlockB, err := k.Lock(ctx, "b")
	if err != nil {
		t.Fatal(err)
	}
	unlockB()
	// Waiting honours the context.
	cctx, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
	defer cancel()
	if _, err := k.Lock(cctx, "a-held"); err == nil {
		t.Fatal("lock of a held key did not wait for the context")
	}
	unlockA()
	wg.Wait()
	if maxA.Load() != 1 {
		t.Fatalf("%d holders of one key at once", maxA.Load())
	}
	if len(k.entries) != 0 {
		t.Fatalf("lock entries leak: %d", len(k.entries))
	}
}
