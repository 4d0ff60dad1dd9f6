package lease

import (
	"regexp"
	"strings"
	"testing"
	"time"

	clocktesting "k8s.io/utils/clock/testing"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

func TestNewLeaseID(t *testing.T) {
	valid := regexp.MustCompile(`^[a-z0-9-]{1,48}$`)
	seen := map[string]bool{}
	for _, pod := range []provider.Pod{
		{Namespace: "ai-agents", Name: "research-agent-7f9c"},
		{Namespace: strings.Repeat("n", 63), Name: strings.Repeat("p.q", 80)},
		{Namespace: "a", Name: "b"},
	} {
		for range 100 {
			id := newLeaseID(pod)
			if !valid.MatchString(id) || seen[id] {
				t.Fatalf("lease ID %q invalid or repeated", id)
			}
			seen[id] = true
		}
	}
	if id := newLeaseID(provider.Pod{Namespace: "ai-agents", Name: "agent"}); !strings.HasPrefix(id, "ai-agents-agent-") {
		t.Errorf("%q does not say which pod it is for", id)
	}
}

func TestBackoff(t *testing.T) {
	m := New(Options{RetryMin: 100 * time.Millisecond, RetryMax: time.Second})
	defer m.Close()
	want := []time.Duration{100, 200, 400, 800, 1000, 1000}
	for i, w := range want {
		if got := m.backoff(i + 1); got != w*time.Millisecond {
			t.Errorf("backoff(%d) = %s, want %s", i+1, got, w*time.Millisecond)
		}
	}
}

func TestParseGID(t *testing.T) {
	for in, want := range map[string]int{"": -1, "0": 0, "2000": 2000} {
		if got, err := ParseGID(in); err != nil || got != want {
			t.Errorf("ParseGID(%q) = %d, %v", in, got, err)
		}
	}
	for _, in := range []string{"wheel", "-1", "99999999999", "1.5"} {
		if _, err := ParseGID(in); err == nil {
			t.Errorf("ParseGID(%q) accepted", in)
		}
	}
}

// The renewal point is on the lease's own timeline: fraction of the grant
// after the grant began, whenever it is computed (a restart included), and
// a grant a max TTL shortened keeps the margin a full grant leaves.
func TestRenewalPointIsOnTheLeasesTimeline(t *testing.T) {
	// A fake clock: the overdue case's timer (due at once) must not fire
	// and re-arm itself before the test reads where it was set.
	clk := clocktesting.NewFakeClock(time.Now())
	m := New(Options{Jitter: 0, RotationGrace: -1, Clock: clk})
	defer m.Close()
	now := clk.Now()
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
		v := &volume{meta: Metadata{VolumeID: name, GrantTTL: tc.grantTTL},
			lease: provider.Lease{ExpiresAt: tc.expires}, granted: tc.granted}
		m.mu.Lock()
		m.vols[name] = v
		m.mu.Unlock()
		m.scheduleRenewal(v)
		m.mu.Lock()
		got := v.renewAt
		m.mu.Unlock()
		if d := got.Sub(tc.want); d < -100*time.Millisecond || d > 100*time.Millisecond {
			t.Errorf("%s: renews at %s from now, want %s", name, got.Sub(now), tc.want.Sub(now))
		}
	}
}

func TestRetryDelayShrinksTowardExpiry(t *testing.T) {
	m := New(Options{})
	defer m.Close()
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
		v := &volume{failures: tc.failures, lease: provider.Lease{ExpiresAt: time.Now().Add(tc.left)}}
		if got := m.retryDelay(v); got < tc.want-100*time.Millisecond || got > tc.want {
			t.Errorf("%d failures, %s left: retry in %s, want %s", tc.failures, tc.left, got, tc.want)
		}
	}
}

// A short TTL renews early enough that a rotation would leave the old
// credential RotationGrace (at most half the TTL) for readers of the old
// files; a long one is not moved.
func TestRenewalLeavesTheRotationGrace(t *testing.T) {
	m := New(Options{Jitter: 0, RotationGrace: 5 * time.Second})
	defer m.Close()
	now := time.Now()
	for name, tc := range map[string]struct {
		ttl  time.Duration
		want time.Duration
	}{
		"6s: half":     {6 * time.Second, 3 * time.Second},
		"12s: 5s left": {12 * time.Second, 7 * time.Second},
		"1m: a third":  {time.Minute, 40 * time.Second},
	} {
		v := &volume{meta: Metadata{VolumeID: name, GrantTTL: tc.ttl},
			lease: provider.Lease{ExpiresAt: now.Add(tc.ttl)}, granted: now}
		m.mu.Lock()
		m.vols[name] = v
		m.mu.Unlock()
		m.scheduleRenewal(v)
		m.mu.Lock()
		got := v.renewAt.Sub(now)
		m.mu.Unlock()
		if d := got - tc.want; d < -100*time.Millisecond || d > 100*time.Millisecond {
			t.Errorf("%s: renews at %s, want %s", name, got, tc.want)
		}
	}
}
