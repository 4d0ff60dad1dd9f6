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

// After Close no timer is armed: those armed are stopped, and a volume
// put later arms none.
func TestCloseStopsEveryTimer(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Now())
	var tab Table
	ctx := context.Background()
	arm := func(id string) {
		h, _ := tab.Lock(ctx, id)
		defer h.Unlock()
		v := h.Volume()
		if v == nil {
			v = New(clk, Initial{Meta: state.Metadata{VolumeID: id}})
			h.Put(v)
		}
		v.Arm(h, time.Second, func() {})
		v.ArmTask(h, "t", time.Second, func() {})
	}
	arm("armed")
	tab.Close()
	arm("armed") // again, after Close
	arm("later") // put after Close
	if clk.HasWaiters() {
		t.Error("a timer is still armed after Close")
	}
}
