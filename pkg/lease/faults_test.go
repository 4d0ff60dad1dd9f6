package lease

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/audit"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// faultKind is how one backend call goes wrong.
type faultKind string

const (
	faultError   faultKind = "error"      // refused before the backend did anything
	faultTimeout faultKind = "timeout"    // no answer until the call's deadline
	faultLost    faultKind = "lost-reply" // the backend did it; the answer never came
	faultSlow    faultKind = "slow"       // the backend answers, after slowCall
)

const slowCall = 300 * time.Millisecond

// faultyProvider passes calls to a real provider, but makes the next call
// of one kind (Issue, Renew, Revoke) fail the way it is told, once.
type faultyProvider struct {
	provider.Provider
	mu   sync.Mutex
	call string
	kind faultKind
}

func (f *faultyProvider) inject(call string, kind faultKind) {
	f.mu.Lock()
	f.call, f.kind = call, kind
	f.mu.Unlock()
}

// take reports the fault for this call, if one is armed, and disarms it.
func (f *faultyProvider) take(call string) faultKind {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.call != call {
		return ""
	}
	f.call = ""
	return f.kind
}

// fail applies fault k around do, the real call.
func fail(ctx context.Context, k faultKind, do func(context.Context) error) error {
	switch k {
	case faultError:
		return fmt.Errorf("%w: injected: connection refused", provider.ErrUnavailable)
	case faultTimeout:
		<-ctx.Done()
		return fmt.Errorf("%w: injected: %w", provider.ErrUnavailable, ctx.Err())
	case faultSlow:
		time.Sleep(slowCall)
	case faultLost:
		if err := do(context.WithoutCancel(ctx)); err != nil {
			return err
		}
		return fmt.Errorf("%w: injected: connection reset before the reply", provider.ErrUnavailable)
	}
	return do(ctx)
}

func (f *faultyProvider) Issue(ctx context.Context, req provider.Request) (l provider.Lease, err error) {
	err = fail(ctx, f.take("Issue"), func(ctx context.Context) error {
		l, err = f.Provider.Issue(ctx, req)
		return err
	})
	if err != nil {
		return provider.Lease{}, err
	}
	return l, nil
}

func (f *faultyProvider) Renew(ctx context.Context, in provider.Lease) (l provider.Lease, err error) {
	err = fail(ctx, f.take("Renew"), func(ctx context.Context) error {
		l, err = f.Provider.Renew(ctx, in)
		return err
	})
	if err != nil {
		return in, err
	}
	return l, nil
}

func (f *faultyProvider) Revoke(ctx context.Context, l provider.Lease) error {
	return fail(ctx, f.take("Revoke"), func(ctx context.Context) error { return f.Provider.Revoke(ctx, l) })
}

// faultCase is one backend call made to fail in one lifecycle step.
type faultCase struct {
	name string
	call string
	// step runs the lifecycle step whose call fails; it returns the
	// error the manager returned, if the step returns one.
	step func(t *testing.T, m *Manager, v Volume) error
	// before brings the volume to where step starts.
	before func(t *testing.T, m *Manager, v Volume)
	// running: the pod uses the volume throughout.
	running bool
	// again is the retry that follows (kubelet's, or the manager's own).
	again func(t *testing.T, m *Manager, v Volume)
}

func halfTTLGone(m *Manager, id string, ttl time.Duration) {
	m.mu.Lock()
	v := m.vols[id]
	v.lease.ExpiresAt = v.lease.ExpiresAt.Add(-ttl / 2)
	m.mu.Unlock()
}

func faultCases(ttl time.Duration) []faultCase {
	return []faultCase{
		{
			name: "publish", call: "Issue",
			step:  func(t *testing.T, m *Manager, v Volume) error { return m.Publish(context.Background(), v) },
			again: func(t *testing.T, m *Manager, v Volume) { publish(t, m, v) },
		},
		{
			name: "rotation", call: "Issue", running: true,
			before: func(t *testing.T, m *Manager, v Volume) { publish(t, m, v) },
			step:   func(t *testing.T, m *Manager, v Volume) error { m.renew(v.ID); return nil },
			again:  func(t *testing.T, m *Manager, v Volume) { m.renew(v.ID) },
		},
		{
			name: "renewal", call: "Renew", running: true,
			before: func(t *testing.T, m *Manager, v Volume) { publish(t, m, v); halfTTLGone(m, v.ID, ttl) },
			step:   func(t *testing.T, m *Manager, v Volume) error { m.renew(v.ID); return nil },
			again:  func(t *testing.T, m *Manager, v Volume) { m.renew(v.ID) },
		},
		{
			name: "revocation", call: "Revoke",
			before: func(t *testing.T, m *Manager, v Volume) { publish(t, m, v); unpublish(t, m, v) },
			step:   func(t *testing.T, m *Manager, v Volume) error { m.drain(context.Background()); return nil },
			again: func(t *testing.T, m *Manager, v Volume) {
				clear(m.retryAt) // as if its backoff had passed
				m.drain(context.Background())
			},
		},
	}
}

// faultOptions time out backend calls quickly, and retry renewals late
// enough that the test's own calls are the only ones.
var faultOptions = Options{BackendTimeout: 300 * time.Millisecond, RetryMin: time.Minute, RetryMax: 2 * time.Minute}

// TestBackendFailsAtEachCall makes each backend call of publish,
// rotation, renewal and revocation fail in each way a call can (refused,
// timed out, done but unanswered), and checks that the pod keeps a
// working credential where it runs, that nothing stays alive without a
// record that revokes it, and that once the backend answers again
// everything ends as it should.
func TestBackendFailsAtEachCall(t *testing.T) {
	needPostgres(t)
	const ttl = time.Hour
	for _, fc := range faultCases(ttl) {
		for _, kind := range []faultKind{faultError, faultTimeout, faultLost} {
			t.Run(fc.name+"/"+fc.call+"/"+string(kind), func(t *testing.T) {
				ctx := context.Background()
				n := newNode(t, ttl)
				fp := &faultyProvider{Provider: n.pg}
				m := n.manager(n.store, fp, faultOptions)
				defer m.Close()
				if err := m.Recover(ctx); err != nil {
					t.Fatal(err)
				}
				v := n.volume("f")
				c := &crashRun{node: n, vol: v}
				if fc.before != nil {
					fc.before(t, m, v)
				}
				fp.inject(fc.call, kind)
				err := fc.step(t, m, v)
				if fp.take(fc.call) != "" {
					t.Fatalf("the step never called %s", fc.call)
				}
				if err != nil && !errors.Is(err, provider.ErrUnavailable) {
					t.Errorf("step failed with %v, want ErrUnavailable", err)
				}
				c.checkRecovered(t, m, fc.running, "after the failed call")
				m.drain(ctx)
				c.checkRecovered(t, m, fc.running, "after the queue drained")

				// The same across a restart: recover a new manager from the store.
				m.Close()
				m = n.manager(n.store, fp, faultOptions)
				defer m.Close()
				if err := m.Recover(ctx); err != nil {
					t.Fatal(err)
				}
				c.checkRecovered(t, m, fc.running, "after a restart")
				fc.again(t, m, v)
				c.checkRecovered(t, m, fc.running, "after the retry")
				if m.has(v.ID) {
					unpublish(t, m, v)
				}
				m.drain(ctx)
				if alive := n.alive(ctx); len(alive) > 0 {
					t.Errorf("credentials left alive after the pod went away: %v", slices.Sorted(maps.Keys(alive)))
				}
				if q, _ := n.store.ListRevocations(); len(q) > 0 {
					t.Errorf("%d revocations left queued", len(q))
				}
			})
		}
	}
}

// A renewal that succeeds only after the lease expired still leaves the
// one expire record of the lapse the pod lived through.
func TestLateRenewalRecordsTheLapse(t *testing.T) {
	needPostgres(t)
	ctx := context.Background()
	n := newNode(t, time.Hour)
	fp := &faultyProvider{Provider: n.pg}
	trail := &auditTrail{}
	o := faultOptions
	o.Audit, o.BackendTimeout = audit.New(trail), 5*time.Second
	m := n.manager(n.store, fp, o)
	defer m.Close()
	if err := m.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	v := n.volume("late")
	publish(t, m, v)
	halfTTLGone(m, v.ID, time.Hour)
	m.mu.Lock()
	lease := m.vols[v.ID].lease
	m.vols[v.ID].lease.ExpiresAt = time.Now().Add(slowCall / 3) // as the manager knows it
	m.mu.Unlock()
	fp.inject("Renew", faultSlow)
	m.renew(v.ID)
	if e := trail.expires(t); e[lease.ID] != 1 || len(e) != 1 {
		t.Fatalf("expire records %v, want one for %s", e, lease.ID)
	}
	m.renew(v.ID) // renewed, not lapsed: no second record
	if e := trail.expires(t); total(e) != 1 {
		t.Fatalf("expire records %v after a timely renewal, want still one", e)
	}
	unpublish(t, m, v)
	m.drain(ctx)
}
