// Package faults wraps a provider so that a test can make its next call of
// one kind (Issue, Renew, Revoke) fail the way a backend call fails:
// refused, timed out, or done by the backend with the reply lost. It
// imports nothing of the lease manager, so the manager's own tests use it.
package faults

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// Kind is how one backend call goes wrong.
type Kind string

// The ways a call fails.
const (
	Error   Kind = "error"      // refused before the backend did anything
	Timeout Kind = "timeout"    // no answer until the call's deadline
	Lost    Kind = "lost-reply" // the backend did it; the answer never came
	Slow    Kind = "slow"       // the backend answers, after SlowCall
)

// Kinds are the ways a call fails that every test goes through.
var Kinds = []Kind{Error, Timeout, Lost}

// SlowCall is how long a Slow call waits before it is made.
const SlowCall = 300 * time.Millisecond

// Provider passes calls to a real provider, but makes the next call of
// one kind fail as injected, once.
type Provider struct {
	provider.Provider
	mu   sync.Mutex
	call string
	kind Kind
}

var _ provider.Provider = (*Provider)(nil)

// Inject arms a fault for the next call named call ("Issue", "Renew",
// "Revoke").
func (f *Provider) Inject(call string, kind Kind) {
	f.mu.Lock()
	f.call, f.kind = call, kind
	f.mu.Unlock()
}

// Armed reports whether a fault is armed and not yet taken.
func (f *Provider) Armed() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.call != ""
}

// Take reports the fault armed for call, if any, and disarms it.
func (f *Provider) Take(call string) Kind {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.call != call {
		return ""
	}
	f.call = ""
	return f.kind
}

// apply runs do, the real call, as fault k says.
func apply(ctx context.Context, k Kind, do func(context.Context) error) error {
	switch k {
	case Error:
		return fmt.Errorf("%w: injected: connection refused", provider.ErrUnavailable)
	case Timeout:
		<-ctx.Done()
		return fmt.Errorf("%w: injected: %w", provider.ErrUnavailable, ctx.Err())
	case Slow:
		time.Sleep(SlowCall)
	case Lost:
		if err := do(context.WithoutCancel(ctx)); err != nil {
			return err
		}
		return fmt.Errorf("%w: injected: connection reset before the reply", provider.ErrUnavailable)
	}
	return do(ctx)
}

// Issue implements provider.Provider.
func (f *Provider) Issue(ctx context.Context, req provider.Request) (l provider.Lease, err error) {
	err = apply(ctx, f.Take("Issue"), func(ctx context.Context) error {
		l, err = f.Provider.Issue(ctx, req)
		return err
	})
	if err != nil {
		return provider.Lease{}, err
	}
	return l, nil
}

// Renew implements provider.Provider.
func (f *Provider) Renew(ctx context.Context, in provider.Lease) (l provider.Lease, err error) {
	err = apply(ctx, f.Take("Renew"), func(ctx context.Context) error {
		l, err = f.Provider.Renew(ctx, in)
		return err
	})
	if err != nil {
		return in, err
	}
	return l, nil
}

// Revoke implements provider.Provider.
func (f *Provider) Revoke(ctx context.Context, l provider.Lease) error {
	return apply(ctx, f.Take("Revoke"), func(ctx context.Context) error { return f.Provider.Revoke(ctx, l) })
}
