package volume

import (
	"math/rand/v2"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// Timing is when a volume's lease is renewed, and retried after a
// failure.
type Timing struct {
	// RenewFraction of a lease's TTL, counted from its grant, after which
	// it is renewed, less up to Jitter of that.
	RenewFraction, Jitter float64
	// RotationGrace is how long a rotated-out lease stays valid for readers
	// of the old files (not positive: none).
	RotationGrace time.Duration
	// RetryMin and RetryMax bound the backoff.
	RetryMin, RetryMax time.Duration
}

// RenewIn is how long from now until v's lease is renewed: RenewFraction
// of its TTL after it was granted (issued, or last renewed), less a random
// jitter so that volumes published together do not all renew together.
// The point is on the lease's own timeline: a restart does not move it
// toward expiry. A lease without expiry (a static secret) is renewed only
// at the RenewAt its provider asks for (a rotation poll), or never (false).
func (t Timing) RenewIn(v *Volume, now time.Time) (time.Duration, bool) {
	l, meta, granted := v.Lease(), v.Meta(), v.Granted()
	if l.ExpiresAt.IsZero() && l.RenewAt.IsZero() {
		return 0, false // nothing ever to renew
	}
	d := time.Duration(1<<63 - 1)
	if exp := l.ExpiresAt; !exp.IsZero() {
		f := t.RenewFraction * (1 - t.Jitter*rand.Float64())
		at := renewPoint(granted, exp, f, now)
		// A grant a max TTL shortened keeps the margin a full one leaves;
		// a short one keeps up to RotationGrace (at most half the TTL), so
		// that a rotation leaves the old credential that long for readers
		// of the old files (found with a real pod under load: a 2 s margin
		// was less than its read-then-login took).
		margin := time.Duration(float64(meta.GrantTTL) * (1 - f))
		if g := min(t.RotationGrace, meta.GrantTTL/2); g > margin {
			margin = g
		}
		if exp.Add(-margin).Before(at) {
			at = exp.Add(-margin)
		}
		d = at.Sub(now)
	}
	if !l.RenewAt.IsZero() {
		d = min(d, l.RenewAt.Sub(now))
	}
	return max(d, 0), true
}

// renewPoint is fraction of the way from granted to expires. Without a
// known grant time (or one not before the expiry) it counts from now.
func renewPoint(granted, expires time.Time, fraction float64, now time.Time) time.Time {
	if granted.IsZero() || !granted.Before(expires) {
		granted = now
	}
	return granted.Add(time.Duration(float64(expires.Sub(granted)) * fraction))
}

// Backoff is the delay before retry number n (1-based), capped.
func (t Timing) Backoff(n int) time.Duration {
	d := t.RetryMin
	for i := 1; i < n && d < t.RetryMax; i++ {
		d *= 2
	}
	return min(d, t.RetryMax)
}

// RetryIn is the delay before the next renewal attempt of v after a
// failure: the backoff, but at most a quarter of the time the lease has
// left, and RetryMin (as often as every second by default) in its last
// minute and once it has lapsed.
func (t Timing) RetryIn(v *Volume, now time.Time) time.Duration {
	d := t.Backoff(v.Failures())
	if exp := v.Lease().ExpiresAt; !exp.IsZero() {
		left := exp.Sub(now)
		if left < time.Minute {
			return t.RetryMin
		}
		d = min(d, left/4)
	}
	return max(d, t.RetryMin)
}

// GraceEnd is when a lease a rotation just replaced may be revoked:
// RotationGrace from now, never past its own expiry (zero: at once). A
// reader that read the old files just before the swap still logs in.
func (t Timing) GraceEnd(l provider.Lease, now time.Time) time.Time {
	if t.RotationGrace <= 0 {
		return time.Time{}
	}
	end := now.Add(t.RotationGrace).UTC()
	if !l.ExpiresAt.IsZero() && l.ExpiresAt.Before(end) {
		end = l.ExpiresAt.UTC()
	}
	return end
}
