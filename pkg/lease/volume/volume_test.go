package volume

import (
	"context"
	"testing"
	"time"

	clocktesting "k8s.io/utils/clock/testing"

	"github.com/ephemeral-secrets/csi-driver/pkg/lease/state"
)

// Only the holder of a volume's lock changes it: a mutator given no lock,
// a released one or another volume's panics, and changes nothing.
func TestChangesNeedTheVolumesLock(t *testing.T) {
	var tab Table
	ctx := context.Background()
	v := New(nil, Initial{Meta: state.Metadata{VolumeID: "a", Role: "before"}})
	other, _ := tab.Lock(ctx, "b")
	defer other.Unlock()
	released, _ := tab.Lock(ctx, "a")
	released.Unlock()
	for name, h := range map[string]*Held{"none": nil, "zero": {}, "released": released, "another volume's": other} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("%s: a change went through", name)
				}
			}()
			v.SetMeta(h, state.Metadata{VolumeID: "a", Role: "after"})
		}()
	}
	if got := v.Meta().Role; got != "before" {
		t.Errorf("role %q after refused changes", got)
	}
	h, _ := tab.Lock(ctx, "a")
	defer h.Unlock()
	v.SetMeta(h, state.Metadata{VolumeID: "a", Role: "after"})
	if got := v.Meta().Role; got != "after" {
		t.Errorf("role %q after a change under the lock", got)
	}
}

// A volume's timers are armed only while it is in its table: not before
// it is put, not once removed, not after Close (which stops those armed).
func TestTimersOnlyInTheTable(t *testing.T) {
	ctx := context.Background()
	for name, tc := range map[string]struct {
		before, after func(*Table, *Held, *Volume) // around arming the timers
		armed         bool
	}{
		"put":             {before: func(_ *Table, h *Held, v *Volume) { h.Put(v) }, armed: true},
		"never put":       {},
		"removed":         {before: func(_ *Table, h *Held, v *Volume) { h.Put(v); h.Remove(v) }},
		"removed after":   {before: func(_ *Table, h *Held, v *Volume) { h.Put(v) }, after: func(_ *Table, h *Held, v *Volume) { h.Remove(v) }},
		"put after Close": {before: func(tab *Table, h *Held, v *Volume) { tab.Close(); h.Put(v) }},
		"closed after":    {before: func(_ *Table, h *Held, v *Volume) { h.Put(v) }, after: func(tab *Table, _ *Held, _ *Volume) { tab.Close() }},
	} {
		clk := clocktesting.NewFakeClock(time.Now())
		var tab Table
		h, _ := tab.Lock(ctx, "v")
		v := New(clk, Initial{Meta: state.Metadata{VolumeID: "v"}})
		if tc.before != nil {
			tc.before(&tab, h, v)
		}
		v.Arm(h, time.Second, func() {})
		v.ArmTask(h, "t", time.Second, func() {})
		if tc.after != nil {
			tc.after(&tab, h, v)
		}
		h.Unlock()
		if clk.HasWaiters() != tc.armed {
			t.Errorf("%s: timers armed %v, want %v", name, clk.HasWaiters(), tc.armed)
		}
	}
}
