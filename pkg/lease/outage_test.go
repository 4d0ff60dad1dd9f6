package lease

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/audit"
	"github.com/ephemeral-secrets/csi-driver/pkg/lease/revocation"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/storage"
)

// killableStore is a store a killed driver no longer writes to: once
// killed, every write fails, as the process would be gone.
type killableStore struct {
	Store
	dead atomic.Bool
}

var errKilled = errors.New("driver killed")

func (s *killableStore) WriteMetadata(m Metadata) error {
	if s.dead.Load() {
		return errKilled
	}
	return s.Store.WriteMetadata(m)
}
func (s *killableStore) WriteLease(id string, l provider.Lease) error {
	if s.dead.Load() {
		return errKilled
	}
	return s.Store.WriteLease(id, l)
}
func (s *killableStore) DeleteLease(id, leaseID string) error {
	if s.dead.Load() {
		return errKilled
	}
	return s.Store.DeleteLease(id, leaseID)
}
func (s *killableStore) PutRevocation(r revocation.Entry) error {
	if s.dead.Load() {
		return errKilled
	}
	return s.Store.PutRevocation(r)
}
func (s *killableStore) DeleteRevocation(id string) error {
	if s.dead.Load() {
		return errKilled
	}
	return s.Store.DeleteRevocation(id)
}
func (s *killableStore) WriteFiles(id string, gid int, files []storage.File) error {
	if s.dead.Load() {
		return errKilled
	}
	return s.Store.WriteFiles(id, gid, files)
}
func (s *killableStore) DeleteVolume(id string) error {
	if s.dead.Load() {
		return errKilled
	}
	return s.Store.DeleteVolume(id)
}
func (s *killableStore) UnmountTarget(target string) error {
	if s.dead.Load() {
		return errKilled
	}
	return s.Store.UnmountTarget(target)
}

// auditTrail collects audit records.
type auditTrail struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (a *auditTrail) Write(p []byte) (int, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.buf.Write(p)
}

// Records are the records written so far.
func (a *auditTrail) Records(t testing.TB) []audit.Record {
	t.Helper()
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []audit.Record
	dec := json.NewDecoder(bytes.NewReader(a.buf.Bytes()))
	for dec.More() {
		var r audit.Record
		if err := dec.Decode(&r); err != nil {
			t.Fatal(err)
		}
		out = append(out, r)
	}
	return out
}

// Count counts the records of stage with outcome ("" for any).
func (a *auditTrail) Count(t testing.TB, stage audit.Stage, outcome string) int {
	n := 0
	for _, r := range a.Records(t) {
		if r.Stage == stage && (outcome == "" || r.Outcome == outcome) {
			n++
		}
	}
	return n
}

// expires counts the expire records per lease ID.
func (a *auditTrail) expires(t *testing.T) map[string]int {
	out := map[string]int{}
	for _, r := range a.Records(t) {
		if r.Stage == audit.Expire {
			out[r.LeaseID]++
		}
	}
	return out
}

func total(m map[string]int) int {
	n := 0
	for _, c := range m {
		n += c
	}
	return n
}

// TestRenewalSurvivesRestartsAndOutages runs pods with a short TTL
// through repeated driver restarts and 1-2 s PostgreSQL outages, each
// followed by at least 1 s of service (so the backend is reachable for 1 s
// in every TTL/3): no credential lapses, and every pod's files log in
// whenever the server is up. Then an outage longer than the TTL forces
// every lease to lapse, with a driver restart inside it: each lapse makes
// exactly one expire record, and every pod gets a working credential once
// the server is back.
func TestRenewalSurvivesRestartsAndOutages(t *testing.T) {
	srv := needPostgres(t)
	const ttl = 9 * time.Second
	n := newNode(t, ttl)
	trail := &auditTrail{}
	lg := audit.New(trail)
	ctx := context.Background()

	var (
		vols   []Volume
		ks     *killableStore
		m      *Manager
		cancel context.CancelFunc
	)
	start := func() {
		ks = &killableStore{Store: n.store}
		// The driver's rotation grace, not the fixture's "revoke at once":
		// the roles reach their maxTTL (4 TTLs, the length of phase 1) and
		// rotate, retried every RetryMin through an outage, so the rotation
		// often lands as the server comes back, just as checkLogins reads
		// the files. A reader that read them just before the swap logs in
		// only because the old role outlives the swap by the grace.
		m = n.manager(ks, n.prov, Options{Audit: lg, RetryMin: 250 * time.Millisecond, RetryMax: 2 * time.Second,
			BackendTimeout: time.Second, RotationGrace: 5 * time.Second})
		if err := m.Recover(ctx); err != nil {
			t.Fatal(err)
		}
		var rctx context.Context
		rctx, cancel = context.WithCancel(ctx)
		go m.Run(rctx)
	}
	kill := func() {
		ks.dead.Store(true)
		cancel()
		m.Close()
		// What was in flight ends (its writes fail): a dead process's
		// calls do not reach the backend after the next one has started.
		for _, v := range vols {
			m.waitFor(ctx, v.ID)
		}
	}
	vols = []Volume{n.volume("o1"), n.volume("o2"), n.volume("o3")}
	start()
	defer func() { kill() }()

	for _, v := range vols {
		publish(t, m, v)
	}
	checkLogins := func(when string) {
		t.Helper()
		for _, v := range vols {
			if err := n.login(ctx, v.TargetPath); err != nil {
				t.Errorf("%s: pod %s cannot log in with its files: %v", when, v.ID, err)
			}
		}
	}

	// Phase 1: outages the renewal must ride out, and restarts.
	rng := rand.New(rand.NewPCG(1, 2))
	deadline := time.Now().Add(4 * ttl)
	for i := 0; time.Now().Before(deadline); i++ {
		down := time.Second + time.Duration(rng.Int64N(int64(time.Second)))
		srv.Stop()
		kill()
		start()
		time.Sleep(down)
		if err := srv.Restart(); err != nil {
			t.Fatal(err)
		}
		checkLogins(fmt.Sprintf("after outage %d", i))
		up := time.Second + time.Duration(rng.Int64N(int64(time.Second)))
		time.Sleep(up / 2)
		kill()
		start()
		time.Sleep(up / 2)
	}
	if e := trail.expires(t); len(e) > 0 {
		t.Fatalf("leases lapsed although the backend was reachable for 1 s in every TTL/3: %v", e)
	}

	// Phase 2: an outage longer than the TTL, the driver restarted in it.
	srv.Stop()
	time.Sleep(ttl / 2)
	kill()
	start()
	time.Sleep(ttl/2 + 2*time.Second)
	if err := srv.Restart(); err != nil {
		t.Fatal(err)
	}
	eventually(t, 3*ttl, "every pod has a working credential again", func() bool {
		for _, v := range vols {
			if n.login(ctx, v.TargetPath) != nil {
				return false
			}
		}
		return true
	})
	e := trail.expires(t)
	if total(e) != len(vols) {
		t.Errorf("%d expire records for %d forced lapses: %v", total(e), len(vols), e)
	}
	for id, c := range e {
		if c != 1 {
			t.Errorf("lease %s has %d expire records, want 1", id, c)
		}
	}
	for _, v := range vols {
		unpublish(t, m, v)
	}
	eventually(t, 10*time.Second, "every role is revoked", func() bool { return len(n.alive(ctx)) == 0 })
}

// eventually polls cond until it holds or timeout passes.
func eventually(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	for end := time.Now().Add(timeout); ; time.Sleep(5 * time.Millisecond) {
		if cond() {
			return
		}
		if time.Now().After(end) {
			t.Fatalf("timed out waiting until %s", what)
		}
	}
}
