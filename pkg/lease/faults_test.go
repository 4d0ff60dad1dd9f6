package lease

import (
	"context"
	"errors"
	"maps"
	"slices"
	"testing"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/audit"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/test/faults"
)

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
			step:   func(t *testing.T, m *Manager, v Volume) error { m.renewNow(v.ID); return nil },
			again:  func(t *testing.T, m *Manager, v Volume) { m.renewNow(v.ID) },
		},
		{
			name: "renewal", call: "Renew", running: true,
			before: func(t *testing.T, m *Manager, v Volume) { publish(t, m, v); m.ageBy(v.ID, ttl/2) },
			step:   func(t *testing.T, m *Manager, v Volume) error { m.renewNow(v.ID); return nil },
			again:  func(t *testing.T, m *Manager, v Volume) { m.renewNow(v.ID) },
		},
		{
			name: "revocation", call: "Revoke",
			before: func(t *testing.T, m *Manager, v Volume) { publish(t, m, v); unpublish(t, m, v) },
			step:   func(t *testing.T, m *Manager, v Volume) error { m.drain(context.Background()); return nil },
			again: func(t *testing.T, m *Manager, v Volume) {
				m.drain(context.Background())
			},
		},
	}
}

// faultOptions time out backend calls quickly (the ledger answers at
// once; PostgreSQL over a real connection may take a while), and retry
// renewals late enough that the test's own calls are the only ones.
func faultOptions(n *node) Options {
	o := Options{BackendTimeout: 300 * time.Millisecond, RetryMin: time.Minute, RetryMax: 2 * time.Minute}
	if n.tier == "memory" {
		o.BackendTimeout = 20 * time.Millisecond
	}
	return o
}

// TestBackendFailsAtEachCall makes each backend call of publish,
// rotation, renewal and revocation fail in each way a call can (refused,
// timed out, done but unanswered), and checks that the pod keeps a
// working credential where it runs, that nothing stays alive without a
// record that revokes it, and that once the backend answers again
// everything ends as it should.
func TestBackendFailsAtEachCall(t *testing.T) {
	const ttl = time.Hour
	for _, tr := range tiers {
		for _, fc := range faultCases(ttl) {
			for _, kind := range faults.Kinds {
				t.Run(tr.name+"/"+fc.name+"/"+fc.call+"/"+string(kind), func(t *testing.T) {
					backendFailsAt(t, tr.newNode(t, ttl), fc, kind)
				})
			}
		}
	}
}

func backendFailsAt(t *testing.T, n *node, fc faultCase, kind faults.Kind) {
	ctx := context.Background()
	fp := &faults.Provider{Provider: n.prov}
	m := n.manager(n.store, fp, faultOptions(n))
	defer m.Close()
	if err := m.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	v := n.volume("f")
	c := &crashRun{node: n, vol: v}
	if fc.before != nil {
		fc.before(t, m, v)
	}
	fp.Inject(fc.call, kind)
	err := fc.step(t, m, v)
	if fp.Take(fc.call) != "" {
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
	m = n.manager(n.store, fp, faultOptions(n))
	defer m.Close()
	if err := m.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	c.checkRecovered(t, m, fc.running, "after a restart")
	fc.again(t, m, v)
	c.checkRecovered(t, m, fc.running, "after the retry")
	if m.Published(v.ID) {
		unpublish(t, m, v)
	}
	m.drain(ctx)
	if alive := n.alive(ctx); len(alive) > 0 {
		t.Errorf("credentials left alive after the pod went away: %v", slices.Sorted(maps.Keys(alive)))
	}
	if q, _ := n.store.ListRevocations(); len(q) > 0 {
		t.Errorf("%d revocations left queued", len(q))
	}
}

// A renewal that succeeds only after the lease expired still leaves the
// one expire record of the lapse the pod lived through.
func TestLateRenewalRecordsTheLapse(t *testing.T) {
	needPostgres(t)
	ctx := context.Background()
	n := newNode(t, time.Hour)
	fp := &faults.Provider{Provider: n.prov}
	trail := &auditTrail{}
	o := faultOptions(n)
	o.Audit, o.BackendTimeout = audit.New(trail), 5*time.Second
	m := n.manager(n.store, fp, o)
	defer m.Close()
	if err := m.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	v := n.volume("late")
	publish(t, m, v)
	m.ageBy(v.ID, 30*time.Minute)
	leaseID, _ := m.expireIn(v.ID, faults.SlowCall/3) // as the manager knows it
	fp.Inject("Renew", faults.Slow)
	m.renewNow(v.ID)
	if e := trail.expires(t); e[leaseID] != 1 || len(e) != 1 {
		t.Fatalf("expire records %v, want one for %s", e, leaseID)
	}
	m.renewNow(v.ID) // renewed, not lapsed: no second record
	if e := trail.expires(t); total(e) != 1 {
		t.Fatalf("expire records %v after a timely renewal, want still one", e)
	}
	unpublish(t, m, v)
	m.drain(ctx)
}

// A provider that leaves the configuration (a reload) and comes back: the
// live lease's renewal keeps being retried and resumes.
func TestRenewalResumesWhenItsProviderIsBack(t *testing.T) {
	inTiers(t, time.Hour, testRenewalResumesWhenItsProviderIsBack)
}

func testRenewalResumesWhenItsProviderIsBack(t *testing.T, n *node) {
	ctx := context.Background()
	reg := n.registry(n.prov)
	o := faultOptions(n)
	o.Store, o.Providers, o.Classes, o.Clock = n.store, reg, n.classes, n.clk
	o.RotationGrace = -1
	m := New(o)
	defer m.Close()
	if err := m.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	v := n.volume("reloaded")
	publish(t, m, v)
	reg.Replace(&provider.Registry{}) // the provider is gone from the file
	m.renewNow(v.ID)
	failures, at := m.renewalState(v.ID)
	if in := at.Sub(n.clk.Now()); failures != 1 || at.IsZero() || in > 2*time.Minute {
		t.Fatalf("after a renewal without its provider: %d failures, next try in %s; want a retry scheduled", failures, in)
	}
	reg.Replace(n.registry(n.prov)) // and back
	m.renewNow(v.ID)
	if failures, _ = m.renewalState(v.ID); failures != 0 {
		t.Fatalf("%d failures after the provider came back; want the lease renewed", failures)
	}
	unpublish(t, m, v)
	m.drain(ctx)
}
