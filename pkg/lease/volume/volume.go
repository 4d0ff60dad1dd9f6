// Package volume is the lease manager's in-memory state of each
// published volume, and the lock discipline that guards it, enforced by
// its types rather than by comments:
//
//   - A Table holds the node's volumes by ID and a lock per volume. Lock
//     hands out a *Held, the one proof of holding a volume's lock; it is
//     held for a whole operation on the volume (backend calls and file
//     writes included: that is what it serialises), never two at once.
//   - A Volume's fields are unexported. Anyone may read them, through
//     methods that return copies; only the holder of the volume's lock
//     changes them: every mutator takes the *Held, and panics on one that
//     is nil, released, or another volume's. A timer is armed only by a
//     mutator, so also only under the lock.
//   - The table's mutex (its map of volumes) and each volume's mutex (its
//     fields) are leaves, taken only inside this package's methods, for a
//     few instructions: nothing waits, writes a file or calls a backend
//     under them. Locks are taken in the order volume lock, table mutex,
//     volume mutex.
//
// A volume's timers are armed only while it is in its table: none before
// it is put there (a recovery that fails half way leaves no timer
// behind), none once it is removed, none after Close, which stops them
// all. The package also keeps the volume's renewal timeline (Timing).
//
// It imports pkg/lease/keylock, pkg/lease/state, pkg/provider, pkg/render
// and pkg/storage; only pkg/lease imports it.
package volume

import (
	"context"
	"crypto/sha256"
	"fmt"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"k8s.io/utils/clock"

	"github.com/ephemeral-secrets/csi-driver/pkg/lease/keylock"
	"github.com/ephemeral-secrets/csi-driver/pkg/lease/state"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/render"
	"github.com/ephemeral-secrets/csi-driver/pkg/storage"
)

// Table is the node's published volumes by ID, with a lock per volume.
// The zero value is ready to use.
type Table struct {
	locks keylock.Keyed

	mu     sync.Mutex // guards vols and closed
	vols   map[string]*Volume
	closed bool
}

// Held is a volume's lock, held: Table.Lock hands it out, Unlock gives it
// back, and every change of the volume takes it.
type Held struct {
	t        *Table
	id       string
	unlock   func()
	released atomic.Bool
}

// Lock waits until volume id is free or ctx is done.
func (t *Table) Lock(ctx context.Context, id string) (*Held, error) {
	unlock, err := t.locks.Lock(ctx, id)
	if err != nil {
		return nil, err
	}
	return &Held{t: t, id: id, unlock: unlock}, nil
}

// Unlock releases the lock; the Held proves nothing any more.
func (h *Held) Unlock() {
	if h.released.CompareAndSwap(false, true) {
		h.unlock()
	}
}

// ID is the volume h locks.
func (h *Held) ID() string { return h.id }

// Volume is the locked volume in the table, or nil.
func (h *Held) Volume() *Volume { return h.t.Get(h.id) }

// Put makes v, of the locked ID, the table's volume: from then on, until
// it is removed or the table closed, its timers may be armed.
func (h *Held) Put(v *Volume) {
	h.check(v)
	h.t.mu.Lock()
	defer h.t.mu.Unlock()
	if h.t.vols == nil {
		h.t.vols = map[string]*Volume{}
	}
	h.t.vols[v.id] = v
	v.mu.Lock()
	v.live = !h.t.closed
	v.mu.Unlock()
}

// Remove stops v's timers and takes it out of the table.
func (h *Held) Remove(v *Volume) {
	h.check(v)
	h.t.mu.Lock()
	if h.t.vols[v.id] == v {
		delete(h.t.vols, v.id)
	}
	h.t.mu.Unlock()
	v.stop()
}

func (h *Held) check(v *Volume) {
	if h == nil || h.t == nil || h.released.Load() || v.id != h.id {
		panic(fmt.Sprintf("volume %s changed without holding its lock", v.id))
	}
}

// Get returns the volume of that ID, or nil.
func (t *Table) Get(id string) *Volume {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.vols[id]
}

// All returns the volumes in the table now.
func (t *Table) All() []*Volume {
	t.mu.Lock()
	defer t.mu.Unlock()
	return slices.Collect(maps.Values(t.vols))
}

// Close stops the timers of every volume, now and put later.
func (t *Table) Close() {
	t.mu.Lock()
	t.closed = true
	vols := slices.Collect(maps.Values(t.vols))
	t.mu.Unlock()
	for _, v := range vols {
		v.stop()
	}
}

// Initial is a volume's state as issued or recovered.
type Initial struct {
	Meta  state.Metadata
	Lease provider.Lease
	// Spec lays out its files; nil for a volume that renders none again (a
	// withdrawn or retired one).
	Spec    *render.Spec
	GID     int // of its files, or -1
	Tokens  map[string]provider.Token
	Granted time.Time // when the lease's current grant began
	Digest  [sha256.Size]byte
}

// Volume is the in-memory state of one published volume.
type Volume struct {
	id   string
	gid  int
	spec *render.Spec
	clk  clock.WithDelayedExecution

	mu       sync.Mutex // guards what follows
	meta     state.Metadata
	lease    provider.Lease
	tokens   map[string]provider.Token
	granted  time.Time                 // its issue or last renewal
	failures int                       // renewals failed in a row
	digest   [sha256.Size]byte         // of the files last written; zero when unknown
	tasks    map[string]provider.Lease // task ID -> its lease

	timer      clock.Timer
	renewAt    time.Time
	taskTimers map[string]clock.Timer // task ID -> its end
	live       bool                   // in its table, open: timers may be armed
}

// New returns the state of a volume, timed by clk.
func New(clk clock.WithDelayedExecution, in Initial) *Volume {
	return &Volume{id: in.Meta.VolumeID, gid: in.GID, spec: in.Spec, clk: clk, meta: in.Meta, lease: in.Lease,
		tokens: in.Tokens, granted: in.Granted, digest: in.Digest, tasks: map[string]provider.Lease{}}
}

// Digest identifies a set of files: names, modes and contents.
func Digest(files []storage.File) [sha256.Size]byte {
	h := sha256.New()
	for _, f := range files {
		fmt.Fprintf(h, "%s\x00%o\x00%d\x00", f.Path, f.Mode, len(f.Data))
		h.Write(f.Data)
	}
	var d [sha256.Size]byte
	h.Sum(d[:0])
	return d
}

// get reads under the volume's mutex.
func get[T any](v *Volume, f func() T) T {
	v.mu.Lock()
	defer v.mu.Unlock()
	return f()
}

// set changes v under its mutex, for the holder of its lock.
func (v *Volume) set(h *Held, f func()) {
	h.check(v)
	v.mu.Lock()
	defer v.mu.Unlock()
	f()
}

// ID is the volume's ID.
func (v *Volume) ID() string { return v.id }

// GID is the group of its files, or -1.
func (v *Volume) GID() int { return v.gid }

// Spec lays out its files.
func (v *Volume) Spec() *render.Spec { return v.spec }

// Meta is its record as last written.
func (v *Volume) Meta() state.Metadata { return get(v, func() state.Metadata { return v.meta }) }

// Lease is its current lease.
func (v *Volume) Lease() provider.Lease { return get(v, func() provider.Lease { return v.lease }) }

// Tokens are the service-account tokens of its last publish.
func (v *Volume) Tokens() map[string]provider.Token {
	return get(v, func() map[string]provider.Token { return v.tokens })
}

// Granted is when its lease's current grant began.
func (v *Volume) Granted() time.Time { return get(v, func() time.Time { return v.granted }) }

// Failures counts its renewals failed in a row.
func (v *Volume) Failures() int { return get(v, func() int { return v.failures }) }

// Digest identifies the files last written.
func (v *Volume) Digest() [sha256.Size]byte {
	return get(v, func() [sha256.Size]byte { return v.digest })
}

// RenewAt is when its renewal timer fires; zero when none is armed.
func (v *Volume) RenewAt() time.Time { return get(v, func() time.Time { return v.renewAt }) }

// Tasks are its task leases by task ID (a copy).
func (v *Volume) Tasks() map[string]provider.Lease {
	return get(v, func() map[string]provider.Lease { return maps.Clone(v.tasks) })
}

// SetMeta records meta as its record, once written.
func (v *Volume) SetMeta(h *Held, meta state.Metadata) { v.set(h, func() { v.meta = meta }) }

// SetTokens keeps the tokens of a republish.
func (v *Volume) SetTokens(h *Held, tokens map[string]provider.Token) {
	v.set(h, func() { v.tokens = tokens })
}

// SetDigest records the digest of the files written (zero: unknown).
func (v *Volume) SetDigest(h *Held, d [sha256.Size]byte) { v.set(h, func() { v.digest = d }) }

// Install makes l, granted at granted and recorded with meta, its lease;
// it clears the failures.
func (v *Volume) Install(h *Held, meta state.Metadata, l provider.Lease, granted time.Time) {
	v.set(h, func() { v.meta, v.lease, v.failures, v.granted = meta, l, 0, granted })
}

// Failed counts a failed renewal and returns how many failed in a row.
func (v *Volume) Failed(h *Held) (n int) {
	v.set(h, func() { v.failures++; n = v.failures })
	return n
}

// SetTask holds l as task's lease.
func (v *Volume) SetTask(h *Held, task string, l provider.Lease) {
	v.set(h, func() { v.tasks[task] = l })
}

// EndTask lets go of task's lease and stops its timer; it returns the
// lease, if it was held.
func (v *Volume) EndTask(h *Held, task string) (l provider.Lease, ok bool) {
	v.set(h, func() {
		l, ok = v.tasks[task]
		delete(v.tasks, task)
		if tm := v.taskTimers[task]; tm != nil {
			tm.Stop()
			delete(v.taskTimers, task)
		}
	})
	return l, ok
}

// ClearTasks lets go of every task lease and stops their timers.
func (v *Volume) ClearTasks(h *Held) {
	v.set(h, func() {
		v.tasks = map[string]provider.Lease{}
		v.stopTasks()
	})
}

// after calls f in a goroutine of its own d from now: a fake clock calls
// its functions as it is stepped, under its own lock.
func (v *Volume) after(d time.Duration, f func()) clock.Timer {
	return v.clk.AfterFunc(d, func() { go f() })
}

// Arm (re)arms the renewal timer to call f after d.
func (v *Volume) Arm(h *Held, d time.Duration, f func()) {
	v.set(h, func() {
		if !v.live {
			return
		}
		if v.timer != nil {
			v.timer.Stop()
		}
		v.renewAt = v.clk.Now().Add(d)
		v.timer = v.after(d, f)
	})
}

// Disarm stops the renewal timer.
func (v *Volume) Disarm(h *Held) {
	v.set(h, func() {
		if v.timer != nil {
			v.timer.Stop()
		}
		v.renewAt = time.Time{}
	})
}

// ArmTask (re)arms task's timer to call f after d.
func (v *Volume) ArmTask(h *Held, task string, d time.Duration, f func()) {
	v.set(h, func() {
		if !v.live {
			return
		}
		if v.taskTimers == nil {
			v.taskTimers = map[string]clock.Timer{}
		}
		if tm := v.taskTimers[task]; tm != nil {
			tm.Stop()
		}
		v.taskTimers[task] = v.after(d, f)
	})
}

// stop stops every timer of v, and arms none until it is put again.
func (v *Volume) stop() {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.live = false
	if v.timer != nil {
		v.timer.Stop()
	}
	v.stopTasks()
}

func (v *Volume) stopTasks() {
	for _, tm := range v.taskTimers {
		tm.Stop()
	}
	v.taskTimers = nil
}
