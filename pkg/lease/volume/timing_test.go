package volume

import (
	"context"
	"testing"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/lease/state"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// timing is the manager's defaults, without jitter.
var timing = Timing{RenewFraction: 2.0 / 3, RotationGrace: -1, RetryMin: time.Second, RetryMax: time.Minute}

func TestBackoff(t *testing.T) {
	tm := Timing{RetryMin: 100 * time.Millisecond, RetryMax: time.Second}
	want := []time.Duration{100, 200, 400, 800, 1000, 1000}
	for i, w := range want {
		if got := tm.Backoff(i + 1); got != w*time.Millisecond {
			t.Errorf("Backoff(%d) = %s, want %s", i+1, got, w*time.Millisecond)
		}
	}
}

// The renewal point is on the lease's own timeline: fraction of the grant
// after the grant began, whenever it is computed (a restart included), and
// a grant a max TTL shortened keeps the margin a full grant leaves.
func TestRenewalPointIsOnTheLeasesTimeline(t *testing.T) {
	now := time.Now()
	for name, tc := range map[string]struct {
		granted, expires time.Time
		grantTTL         time.Duration
		want             time.Time
	}{
		"fresh":                  {now, now.Add(9 * time.Second), 9 * time.Second, now.Add(6 * time.Second)},
		"a third gone (restart)": {now.Add(-3 * time.Second), now.Add(6 * time.Second), 9 * time.Second, now.Add(3 * time.Second)},
		"capped by max TTL":      {now, now.Add(6 * time.Second), 9 * time.Second, now.Add(3 * time.Second)},
		"overdue":                {now.Add(-8 * time.Second), now.Add(time.Second), 9 * time.Second, now},
		"grant time unknown":     {time.Time{}, now.Add(9 * time.Second), 0, now.Add(6 * time.Second)},
	} {
		v := New(nil, Initial{Meta: state.Metadata{VolumeID: name, GrantTTL: tc.grantTTL},
			Lease: provider.Lease{ExpiresAt: tc.expires}, Granted: tc.granted})
		d, ok := timing.RenewIn(v, now)
		if got := now.Add(d); !ok || got.Sub(tc.want).Abs() > time.Millisecond {
			t.Errorf("%s: renews at %s from now (%v), want %s", name, d, ok, tc.want.Sub(now))
		}
	}
	if _, ok := timing.RenewIn(New(nil, Initial{}), now); ok {
		t.Error("a lease without expiry or RenewAt is renewed")
	}
}

func TestRetryDelayShrinksTowardExpiry(t *testing.T) {
	var tab Table
	now := time.Now()
	for _, tc := range []struct {
		failures int
		left     time.Duration
		want     time.Duration
	}{
		{1, 10 * time.Minute, time.Second},                         // the backoff
		{8, 10 * time.Minute, time.Minute},                         // the backoff, capped
		{8, 2 * time.Minute, 30 * time.Second},                     // a quarter of what is left
		{8, 30 * time.Second, time.Second},                         // the last minute: RetryMin
		{8, -5 * time.Second, time.Second},                         // lapsed: RetryMin
		{8, 3*time.Second + time.Minute, 15750 * time.Millisecond}, // just over a minute left
	} {
		v := New(nil, Initial{Meta: state.Metadata{VolumeID: "v"}, Lease: provider.Lease{ExpiresAt: now.Add(tc.left)}})
		h, _ := tab.Lock(context.Background(), "v")
		for range tc.failures {
			v.Failed(h)
		}
		h.Unlock()
		if got := timing.RetryIn(v, now); got != tc.want {
			t.Errorf("%d failures, %s left: retry in %s, want %s", tc.failures, tc.left, got, tc.want)
		}
	}
}

// A short TTL renews early enough that a rotation would leave the old
// credential RotationGrace (at most half the TTL) for readers of the old
// files; a long one is not moved.
func TestRenewalLeavesTheRotationGrace(t *testing.T) {
	tm := timing
	tm.RotationGrace = 5 * time.Second
	now := time.Now()
	for name, tc := range map[string]struct {
		ttl  time.Duration
		want time.Duration
	}{
		"6s: half":     {6 * time.Second, 3 * time.Second},
		"12s: 5s left": {12 * time.Second, 7 * time.Second},
		"1m: a third":  {time.Minute, 40 * time.Second},
	} {
		v := New(nil, Initial{Meta: state.Metadata{VolumeID: name, GrantTTL: tc.ttl},
			Lease: provider.Lease{ExpiresAt: now.Add(tc.ttl)}, Granted: now})
		if got, _ := tm.RenewIn(v, now); (got - tc.want).Abs() > time.Millisecond {
			t.Errorf("%s: renews at %s, want %s", name, got, tc.want)
		}
	}
}
