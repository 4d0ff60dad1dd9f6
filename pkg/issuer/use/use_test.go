package use_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http/httptest"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"k8s.io/klog/v2"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/ephemeral-secrets/csi-driver/pkg/audit"
	"github.com/ephemeral-secrets/csi-driver/pkg/credential"
	"github.com/ephemeral-secrets/csi-driver/pkg/issuer"
	pgengine "github.com/ephemeral-secrets/csi-driver/pkg/issuer/postgres"
	"github.com/ephemeral-secrets/csi-driver/pkg/issuer/use"
	"github.com/ephemeral-secrets/csi-driver/pkg/metrics"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider/postgres"
	"github.com/ephemeral-secrets/csi-driver/test/pgtest"
)

var pg *pgtest.Server

// thief is the second loopback address a stolen credential is used from:
// the server listens on 127.0.0.1 and lets 127.0.0.2 log in too, and the
// addresses of thieves (thieves(i)).
const thief = "127.0.0.2"

// thieves is the i-th (0 to 253) of many loopback addresses a stolen
// credential is used from.
func thieves(i int) string { return fmt.Sprintf("127.0.1.%d", i+1) }

func TestMain(m *testing.M) {
	var err error
	if pg, err = pgtest.StartWith(pgtest.Options{ClientNets: []string{thief + "/32", "127.0.1.0/24"}}); err != nil {
		fmt.Println(err)
		os.Exit(1)
	}
	code := m.Run()
	pg.Close()
	os.Exit(code)
}

const create = `CREATE ROLE "{{.Name}}" LOGIN PASSWORD '{{.Password}}' VALID UNTIL '{{.Expiration}}'`

// world is one tracker over the test server, the issuer that mints into
// it, and everything the tracker tells.
type world struct {
	t       *testing.T
	iss     *issuer.Issuer
	node    *postgres.Provider
	admin   *pgengine.Admin
	tracker *use.Tracker
	clock   *clocktesting.FakeClock
	rec     *recorder
	meter   *meter
	audit   *bytes.Buffer
	auditMu *sync.Mutex
	files   []string // leases whose files were withdrawn (in-process)
}

type setup struct {
	admin           string // the admin's URL (default the superuser)
	onForeignUse    string // the role's
	unusedAfter     time.Duration
	expected        []string // the connection's expectedSources (default 127.0.0.1/32)
	recorder        bool     // a Recorder (the cluster's inventory); else files are withdrawn in-process
	resolver        use.Resolver
	noExpectedCIDRs bool
	revocation      []string // the role's revocationStatements (default the driver's)
}

func newWorld(t *testing.T, s setup) *world {
	t.Helper()
	if s.admin == "" {
		s.admin = pg.AdminURL()
	}
	if s.expected == nil && !s.noExpectedCIDRs {
		s.expected = []string{"127.0.0.1/32"}
	}
	cfg := func() pgengine.Config {
		return pgengine.Config{Connections: map[string]*pgengine.Connection{"main": {
			URL: s.admin, ExpectedSources: s.expected,
			Roles: map[string]*pgengine.Role{"app": {
				CreationStatements: []string{create}, OnForeignUse: s.onForeignUse, RevocationStatements: s.revocation,
				UnusedAfter: pgengine.Duration{Duration: s.unusedAfter},
				Allowed:     []pgengine.Subject{{Namespace: "team", ServiceAccount: "app"}},
			}},
		}}}
	}
	clk := clocktesting.NewFakeClock(time.Now())
	iss, err := issuer.New(issuer.Options{Config: cfg(), Now: clk.Now}) // its roles' tags are of the tracker's time
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(iss.Close)
	admin, err := pgengine.NewAdmin(cfg())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(admin.Close)
	w := &world{t: t, iss: iss, node: postgres.NewNode(iss.Local()), admin: admin,
		clock: clk, meter: &meter{}, audit: &bytes.Buffer{}, auditMu: &sync.Mutex{}}
	o := use.Options{
		Engine: admin, Clock: w.clock, Meter: w.meter, Audit: audit.New(lockedWriter{w.audit, w.auditMu}), Resolver: s.resolver,
		Drop: func(ctx context.Context, e credential.Record) error {
			_, err := admin.Drop(ctx, "main", e.Name, e.LeaseID, nil)
			return err
		},
	}
	if s.recorder {
		w.rec = &recorder{}
		o.Recorder = w.rec
	} else {
		o.WithdrawFiles = func(_ context.Context, e credential.Record, reason string) error {
			w.files = append(w.files, e.LeaseID)
			return nil
		}
	}
	w.tracker = use.New(o)
	t.Cleanup(w.tracker.Close)
	return w
}

type lockedWriter struct {
	w  io.Writer
	mu *sync.Mutex
}

func (l lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// issue mints a credential for pod through the in-process issuer.
func (w *world) issue(id, pod string) provider.Lease {
	w.t.Helper()
	params := map[string]string{postgres.ConnectionParam: "main", postgres.RoleParam: "app"}
	l, err := w.node.Issue(context.Background(), provider.Request{LeaseID: id, Class: "team/db", Params: params,
		Pod: provider.Pod{Namespace: "team", Name: pod, UID: "uid-" + pod, ServiceAccount: "app"}})
	if err != nil {
		w.t.Fatal(err)
	}
	return l
}

// login opens a session of l's role from the local address from.
func (w *world) login(l provider.Lease, from string) *pgx.Conn {
	w.t.Helper()
	cfg, err := pgx.ParseConfig(pg.URL(l.Values["username"], l.Values["password"]))
	if err != nil {
		w.t.Fatal(err)
	}
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}, Timeout: 5 * time.Second}
	cfg.DialFunc = d.DialContext
	c, err := pgx.ConnectConfig(context.Background(), cfg)
	if err != nil {
		w.t.Fatalf("login from %s: %v", from, err)
	}
	w.t.Cleanup(func() { _ = c.Close(context.Background()) })
	return c
}

// sample steps the clock by d and samples once.
func (w *world) sample(d time.Duration) {
	w.t.Helper()
	w.clock.Step(d)
	if err := w.tracker.Sample(context.Background()); err != nil {
		w.t.Fatal(err)
	}
}

// records are the audit records of stage use of lease.
func (w *world) records(lease string) []audit.Record {
	w.auditMu.Lock()
	defer w.auditMu.Unlock()
	var out []audit.Record
	dec := json.NewDecoder(bytes.NewReader(w.audit.Bytes()))
	for dec.More() {
		var r audit.Record
		if err := dec.Decode(&r); err != nil {
			w.t.Fatal(err)
		}
		if r.Stage == audit.Use && r.LeaseID == lease {
			out = append(out, r)
		}
	}
	return out
}

func events(rs []audit.Record) []string {
	out := make([]string, len(rs))
	for i, r := range rs {
		out[i] = r.Use.Event
		if r.Use.Action != "" {
			out[i] += ":" + r.Use.Action
		}
	}
	return out
}

// A login from an address the connection lists is a use: its first use,
// its source, its summary when the role goes; the Recorder hears the
// first use and the summary.
func TestExpectedUse(t *testing.T) {
	ctx := context.Background()
	w := newWorld(t, setup{recorder: true})
	l := w.issue("team-u-expected1", "u")
	w.sample(time.Second)
	if u, ok := w.tracker.Usage("team-u-expected1"); !ok || !u.FirstUsedAt.IsZero() || !u.Sampled {
		t.Fatalf("before a login: %+v, %v", u, ok)
	}
	c := w.login(l, "127.0.0.1")
	w.sample(time.Second)
	u, _ := w.tracker.Usage("team-u-expected1")
	if u.FirstUsedAt.IsZero() || len(u.Sources) != 1 || u.Sources[0].Address != "127.0.0.1" || u.Sources[0].Foreign || u.Sessions != 1 {
		t.Fatalf("after a login: %+v", u)
	}
	c2 := w.login(l, "127.0.0.1")
	w.sample(time.Second)
	// LastUsedAt alone is written at most once a minute.
	for range 60 {
		w.sample(time.Second)
	}
	_ = c2.Close(ctx)
	_ = c.Close(ctx)
	if got := events(w.records("team-u-expected1")); !slices.Equal(got, []string{"first"}) {
		t.Fatalf("use records %v, want [first]", got)
	}
	if err := w.node.Revoke(ctx, leaseOf(l, "team-u-expected1")); err != nil {
		t.Fatal(err)
	}
	w.sample(time.Second)
	rs := w.records("team-u-expected1")
	if got := events(rs); !slices.Equal(got, []string{"first", "summary"}) {
		t.Fatalf("use records %v, want [first summary]", got)
	}
	sum := rs[1]
	if !strings.Contains(sum.Detail, "used: 2 sessions seen") || sum.Use.Usage == nil || sum.Use.Usage.Sessions != 2 || !sum.Use.Usage.Sampled {
		t.Errorf("summary: %s %+v", sum.Detail, sum.Use.Usage)
	}
	w.tracker.Close()
	if got := w.rec.calls(); !slices.Equal(got, []string{"used team-u-expected1", "used team-u-expected1", "used team-u-expected1"}) {
		t.Errorf("recorder heard %v", got)
	}
	if w.meter.get("first") != 1 || w.meter.get("sessions") != 2 || w.meter.get("foreign") != 0 || w.meter.get("never") != 0 {
		t.Errorf("metrics %v", w.meter.counts)
	}
}

func leaseOf(l provider.Lease, id string) provider.Lease {
	l.ID, l.Provider = id, postgres.Name
	l.Params = map[string]string{postgres.ConnectionParam: "main", postgres.RoleParam: "app"}
	return l
}

// A login from an address none expected is a foreign use, acted on as the
// role says: alert warns the pod, revoke also ends every session of the
// role, withdraws the credential and drops the role, record only records.
func TestForeignUse(t *testing.T) {
	for _, tc := range []struct {
		name, action string
		recorder     bool
		warned       bool
		killed       bool
		revocation   []string
	}{
		{name: "alert", action: "alert", recorder: true, warned: true},
		{name: "revoke", action: "revoke", recorder: true, warned: true, killed: true},
		{name: "revoke-inprocess", action: "revoke", killed: true}, // the files are withdrawn
		// The admin's revocation statements leave sessions be: the kill
		// ends them itself.
		{name: "revoke-custom", action: "revoke", recorder: true, warned: true, killed: true,
			revocation: []string{`DROP ROLE IF EXISTS "{{.Name}}"`}},
		{name: "record", action: "record", recorder: true},
	} {
		name := tc.name
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			w := newWorld(t, setup{onForeignUse: tc.action, recorder: tc.recorder, revocation: tc.revocation})
			id := "team-f-" + name
			l := w.issue(id, "f")
			own := w.login(l, "127.0.0.1")
			w.sample(time.Second)
			stolen := w.login(l, thief)
			w.sample(time.Second)

			rs := w.records(id)
			want := []string{"first", "source", "foreign:" + tc.action}
			if tc.killed {
				want = append(want, "kill:revoke")
			}
			if got := events(rs); !slices.Equal(got, want) {
				t.Fatalf("use records %v, want %v", got, want)
			}
			if rs[1].Use.Source != thief || !rs[1].Use.Foreign {
				t.Errorf("new source record: %+v", rs[1].Use)
			}
			if w.meter.get("foreign "+tc.action) != 1 {
				t.Errorf("metrics %v", w.meter.counts)
			}
			w.tracker.Close()
			var calls []string
			if w.rec != nil {
				calls = w.rec.calls()
			}
			warned := slices.Contains(calls, "elsewhere "+id+" "+thief+" "+tc.action)
			if warned != tc.warned {
				t.Errorf("pod warned: %v, want %v (%v)", warned, tc.warned, calls)
			}
			withdrawn := slices.Contains(calls, "withdraw "+id) || slices.Contains(w.files, id)
			if withdrawn != tc.killed {
				t.Errorf("withdrawn: %v, want %v (recorder %v, files %v)", withdrawn, tc.killed, calls, w.files)
			}
			_, stolenErr := stolen.Exec(ctx, `SELECT 1`)
			_, ownErr := own.Exec(ctx, `SELECT 1`)
			roleExists, err := pg.RoleExists(ctx, l.Values["username"])
			if err != nil {
				t.Fatal(err)
			}
			if tc.killed {
				w.sample(time.Second) // the role is gone: its summary
				if got := events(w.records(id)); got[len(got)-1] != "summary" {
					t.Errorf("no summary after the kill: %v", got)
				}
				if stolenErr == nil || ownErr == nil {
					t.Errorf("sessions survive the kill: thief's error %v, pod's %v", stolenErr, ownErr)
				}
				if roleExists {
					t.Error("the role survives the kill")
				}
				if !strings.Contains(rs[3].Detail, "2 sessions ended") || rs[3].Outcome != audit.Success {
					t.Errorf("kill record: %s %s %s", rs[3].Detail, rs[3].Outcome, rs[3].Error)
				}
			} else {
				if stolenErr != nil || ownErr != nil || !roleExists {
					t.Errorf("%s ended something: thief's %v, pod's %v, role exists %v", tc.action, stolenErr, ownErr, roleExists)
				}
				_ = w.node.Revoke(ctx, leaseOf(l, id))
			}
		})
	}
}

// A kill whose withdrawal fails keeps the role (unable to log in, its
// sessions ended) so that the next sample kills it again: dropped, the
// role would leave the samples, the withdrawal would never be retried,
// and the volume would be issued a credential again.
func TestKillRetriesAFailedWithdrawalBeforeDropping(t *testing.T) {
	ctx := context.Background()
	w := newWorld(t, setup{onForeignUse: "revoke", recorder: true})
	w.rec.failWithdraw = 1
	id := "team-f-retry"
	l := w.issue(id, "f")
	w.login(l, thief)
	w.sample(time.Second)
	exists, err := pg.RoleExists(ctx, l.Values["username"])
	if err != nil {
		t.Fatal(err)
	}
	if !exists {
		t.Fatal("the role was dropped though its record could not be withdrawn")
	}
	if _, err := pgx.Connect(ctx, pg.URL(l.Values["username"], l.Values["password"])); err == nil {
		t.Error("a role whose kill is under way still logs in")
	}
	w.sample(time.Second)
	if !slices.Contains(w.rec.calls(), "withdraw "+id) {
		t.Fatalf("the withdrawal was not tried again: %v", w.rec.calls())
	}
	if exists, err = pg.RoleExists(ctx, l.Values["username"]); err != nil || exists {
		t.Errorf("after the withdrawal held, the role exists: %v %v", exists, err)
	}
	got := events(w.records(id))
	if n := len(slices.DeleteFunc(slices.Clone(got), func(e string) bool { return e != "kill:revoke" })); n != 2 {
		t.Errorf("use records %v, want two kill records (the failed one, then the one that held)", got)
	}
}

// Run samples at once, then at each tick of its clock, until its context
// ends.
func TestRunSamplesEveryInterval(t *testing.T) {
	w := newWorld(t, setup{})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); w.tracker.Run(ctx) }()
	waitFor := func(n int) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for w.meter.get("samples") < n {
			if time.Now().After(deadline) {
				t.Fatalf("%d samples, want %d", w.meter.get("samples"), n)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	waitFor(1)
	for !w.clock.HasWaiters() {
		time.Sleep(time.Millisecond)
	}
	w.clock.Step(use.DefaultInterval)
	waitFor(2)
	if n := w.meter.get("samples"); n != 2 {
		t.Errorf("%d samples after one interval, want 2", n)
	}
	cancel()
	<-done
}

// A credential never used is revoked with a "never used" summary; one
// that outlives its role's unusedAfter without a use is said to be
// unused, once.
func TestNeverUsed(t *testing.T) {
	ctx := context.Background()
	w := newWorld(t, setup{unusedAfter: time.Minute})
	l := w.issue("team-n-neverused", "n")
	w.sample(time.Second)
	w.sample(30 * time.Second)
	if got := events(w.records("team-n-neverused")); len(got) != 0 {
		t.Fatalf("before unusedAfter: %v", got)
	}
	w.sample(31 * time.Second)
	w.sample(time.Second)
	if got := events(w.records("team-n-neverused")); !slices.Equal(got, []string{"unused"}) {
		t.Fatalf("after unusedAfter: %v, want [unused]", got)
	}
	if err := w.node.Revoke(ctx, leaseOf(l, "team-n-neverused")); err != nil {
		t.Fatal(err)
	}
	w.sample(time.Second)
	rs := w.records("team-n-neverused")
	if got := events(rs); !slices.Equal(got, []string{"unused", "summary"}) || rs[1].Detail != "revoked; never used" {
		t.Fatalf("records %v, summary %q", got, rs[len(rs)-1].Detail)
	}
	if w.meter.get("never app") != 1 || w.meter.get("unused app") != 1 {
		t.Errorf("metrics %v", w.meter.counts)
	}
}

// An admin without pg_read_all_stats cannot see other roles' sessions:
// the tracker says it is blind and never calls a credential unused, even
// one that was never used; granted the role, it sees.
func TestBlindAdminNeverSaysUnused(t *testing.T) {
	ctx := context.Background()
	if err := pg.Exec(ctx, `CREATE ROLE csi_blind LOGIN CREATEROLE PASSWORD 'blind-admin'`); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pg.Exec(ctx, `DROP ROLE IF EXISTS csi_blind`) })
	w := newWorld(t, setup{admin: pg.URL("csi_blind", "blind-admin"), unusedAfter: time.Second})
	used := w.issue("team-b-blindused", "b")
	never := w.issue("team-b-blindnever", "b")
	w.login(used, thief) // foreign, were it seen
	w.sample(time.Second)
	w.sample(5 * time.Second)
	if !w.meter.blind["main"] {
		t.Fatal("the blind gauge is not set")
	}
	u, _ := w.tracker.Usage("team-b-blindused")
	if u.Sampled || len(u.Sources) != 0 || u.FirstUsedAt.IsZero() {
		t.Errorf("a hidden session: %+v (want a use, no source, not sampled)", u)
	}
	for _, l := range []provider.Lease{leaseOf(used, "team-b-blindused"), leaseOf(never, "team-b-blindnever")} {
		if err := w.node.Revoke(ctx, l); err != nil {
			t.Fatal(err)
		}
	}
	w.sample(time.Second)
	rs := w.records("team-b-blindnever")
	if got := events(rs); !slices.Equal(got, []string{"summary"}) || strings.Contains(rs[0].Detail, "never used") || rs[0].Use.Usage.Sampled {
		t.Fatalf("blind summary: %v %q", got, rs[len(rs)-1].Detail)
	}
	if w.meter.get("never app") != 0 || w.meter.get("unused app") != 0 || w.meter.get("foreign") != 0 {
		t.Errorf("a blind tracker counted %v", w.meter.counts)
	}

	// Granted pg_read_all_stats (the admin SQL's one line), it sees.
	if err := pg.Exec(ctx, `GRANT pg_read_all_stats TO csi_blind`); err != nil {
		t.Fatal(err)
	}
	l := w.issue("team-b-granted01", "b")
	w.login(l, thief)
	w.sample(time.Second)
	if w.meter.blind["main"] {
		t.Error("still blind after the grant")
	}
	if u, _ := w.tracker.Usage("team-b-granted01"); len(u.Sources) != 1 || !u.Sources[0].Foreign || !u.Sampled {
		t.Errorf("after the grant: %+v", u)
	}
	_ = w.node.Revoke(ctx, leaseOf(l, "team-b-granted01"))
}

// README's least-privilege admin (CREATEROLE, no superuser) with the one
// grant use observation needs (pg_read_all_stats) sees a foreign use and
// kills it: it ends the sessions itself (the admin's revocation
// statements here leave them be) and drops the role.
func TestLeastPrivilegeAdminKills(t *testing.T) {
	ctx := context.Background()
	if err := pg.Exec(ctx, `CREATE ROLE csi_least_use LOGIN CREATEROLE PASSWORD 'least-use-admin'`,
		`GRANT pg_read_all_stats TO csi_least_use`); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pg.Exec(ctx, `DROP ROLE IF EXISTS csi_least_use`) })
	w := newWorld(t, setup{admin: pg.URL("csi_least_use", "least-use-admin"), onForeignUse: "revoke", recorder: true,
		revocation: []string{`GRANT "{{.Name}}" TO CURRENT_USER`, `DROP ROLE IF EXISTS "{{.Name}}"`}})
	l := w.issue("team-l-leastkill", "l")
	stolen := w.login(l, thief)
	w.sample(time.Second)
	if w.meter.blind["main"] {
		t.Fatal("blind with pg_read_all_stats")
	}
	if _, err := stolen.Exec(ctx, `SELECT 1`); err == nil {
		t.Error("the thief's session outlives the kill")
	}
	if exists, err := pg.RoleExists(ctx, l.Values["username"]); err != nil || exists {
		t.Errorf("the role survives the kill: %v %v", exists, err)
	}
}

// The pod's and node's addresses (the Resolver's) are expected; the
// Resolver is asked once per credential, and only for an address the
// connection's networks do not cover.
func TestResolverAddressesAreExpected(t *testing.T) {
	ctx := context.Background()
	res := &resolver{addrs: []netip.Addr{netip.MustParseAddr(thief)}}
	w := newWorld(t, setup{resolver: res})
	l := w.issue("team-r-resolved1", "r")
	w.login(l, "127.0.0.1")
	w.sample(time.Second)
	if res.asked != 0 {
		t.Errorf("the resolver was asked %d times for an address the networks cover", res.asked)
	}
	w.login(l, thief)
	w.sample(time.Second)
	w.login(l, thief)
	w.sample(time.Second)
	u, _ := w.tracker.Usage("team-r-resolved1")
	if len(u.Sources) != 2 || u.Sources[1].Foreign || res.asked != 1 {
		t.Errorf("usage %+v, resolver asked %d times", u, res.asked)
	}
	_ = w.node.Revoke(ctx, leaseOf(l, "team-r-resolved1"))
}

// The pod's own address is never foreign for coming before the pod's IPs
// are known (kubelet mints the credential before the sandbox has an
// address) or after they changed (a new sandbox): the tracker waits for
// them, and asks again before it calls an address foreign. A pod that
// never gets one is judged without it after PodAddressWait.
func TestPodAddressesAreWaitedForAndAskedAgain(t *testing.T) {
	ctx := context.Background()
	t.Run("not yet", func(t *testing.T) {
		res := &resolver{err: use.ErrNoPodAddress}
		w := newWorld(t, setup{resolver: res, noExpectedCIDRs: true, onForeignUse: "revoke", recorder: true})
		l := w.issue("team-r-noip", "r")
		w.login(l, thief)
		w.sample(time.Second)
		if u, _ := w.tracker.Usage("team-r-noip"); len(u.Sources) != 0 {
			t.Fatalf("a source classed before the pod had an IP: %+v", u.Sources)
		}
		res.addrs, res.err = []netip.Addr{netip.MustParseAddr(thief)}, nil // the pod's IP is known now
		w.sample(time.Second)
		if u, _ := w.tracker.Usage("team-r-noip"); len(u.Sources) != 1 || u.Sources[0].Foreign {
			t.Errorf("the pod's own address: %+v", u.Sources)
		}
		if slices.Contains(w.rec.calls(), "withdraw team-r-noip") {
			t.Error("the pod's own use was killed")
		}
		_ = w.node.Revoke(ctx, leaseOf(l, "team-r-noip"))
	})
	t.Run("never", func(t *testing.T) {
		res := &resolver{err: use.ErrNoPodAddress}
		w := newWorld(t, setup{resolver: res, noExpectedCIDRs: true})
		l := w.issue("team-r-never", "r")
		w.login(l, thief)
		w.sample(time.Second)
		w.sample(use.PodAddressWait)
		if u, _ := w.tracker.Usage("team-r-never"); len(u.Sources) != 1 || !u.Sources[0].Foreign {
			t.Errorf("a use while the pod never had an IP: %+v, want foreign after %v", u.Sources, use.PodAddressWait)
		}
		_ = w.node.Revoke(ctx, leaseOf(l, "team-r-never"))
	})
	t.Run("changed", func(t *testing.T) {
		res := &resolver{addrs: []netip.Addr{netip.MustParseAddr("127.0.0.1")}}
		w := newWorld(t, setup{resolver: res, noExpectedCIDRs: true})
		l := w.issue("team-r-moved", "r")
		w.login(l, "127.0.0.1")
		w.sample(time.Second)
		res.addrs = append(res.addrs, netip.MustParseAddr(thief)) // a new sandbox, a new IP
		w.login(l, thief)
		w.sample(time.Second)
		u, _ := w.tracker.Usage("team-r-moved")
		if len(u.Sources) != 2 || u.Sources[0].Foreign || u.Sources[1].Foreign || res.asked != 2 {
			t.Errorf("sources %+v after the pod's IP changed, resolver asked %d times (want 2)", u.Sources, res.asked)
		}
		_ = w.node.Revoke(ctx, leaseOf(l, "team-r-moved"))
	})
}

// No credential value reaches the audit trail, the log or the metrics,
// even for a foreign use that is killed.
func TestNoCredentialInRecordsLogsOrMetrics(t *testing.T) {
	var logs bytes.Buffer
	restore := captureLogs(&logs)
	defer restore()
	ctx := context.Background()
	res := &resolver{err: errors.New("the API is away")}
	w := newWorld(t, setup{onForeignUse: "revoke", recorder: true, resolver: res})
	m := metrics.NewIssuer(metrics.IssuerOptions{})
	w.tracker = use.New(use.Options{Engine: w.admin, Clock: w.clock, Meter: m.Use(), Audit: audit.New(lockedWriter{w.audit, w.auditMu}),
		Recorder: w.rec, Resolver: res, Drop: func(ctx context.Context, e credential.Record) error {
			_, err := w.admin.Drop(ctx, "main", e.Name, e.LeaseID, nil)
			return err
		}})
	l := w.issue("team-s-secretsno", "s")
	w.login(l, thief)
	w.sample(time.Second) // the resolver fails: nothing classed yet
	res.err = nil
	w.sample(time.Second)
	w.sample(time.Second)
	if got := events(w.records("team-s-secretsno")); !slices.Contains(got, "foreign:revoke") {
		t.Fatalf("no foreign use recorded: %v", got)
	}
	srv := httptest.NewServer(m.Handler(func() bool { return true }))
	defer srv.Close()
	resp, err := srv.Client().Get(srv.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	exposition, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	_ = ctx
	w.tracker.Close()
	w.auditMu.Lock()
	trail := w.audit.String()
	w.auditMu.Unlock()
	for what, text := range map[string]string{"audit": trail, "log": logs.String(), "metrics": string(exposition), "recorder": w.rec.text()} {
		if text == "" {
			t.Errorf("no %s captured: the check proves nothing", what)
		}
		if strings.Contains(text, l.Values["password"]) {
			t.Errorf("the %s holds the credential's password", what)
		}
	}
	if !strings.Contains(string(exposition), `ephemeral_secrets_use_foreign_total{action="revoke",connection="main",role="app"} 1`) {
		t.Errorf("metrics lack the foreign use:\n%s", exposition)
	}
}

// recorder is a Recorder that notes its calls (the inventory's real one
// is pkg/inventory's, tested there against an API server).
type recorder struct {
	mu  sync.Mutex
	log []string
	raw []string
	// failWithdraw fails that many Withdraws before the next succeeds;
	// failElsewhere that many UsedElsewheres. holdElsewhere, when set,
	// holds each UsedElsewhere until it is closed; elsewhereTries and
	// elsewhereDone count the calls made and returned.
	failWithdraw, failElsewhere   int
	holdElsewhere                 chan struct{}
	elsewhereTries, elsewhereDone int
}

func (r *recorder) note(s string, v any) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.log = append(r.log, s)
	b, _ := json.Marshal(v)
	r.raw = append(r.raw, string(b))
	return nil
}

func (r *recorder) Used(_ context.Context, e credential.Record, u credential.Usage) error {
	return r.note("used "+e.LeaseID, []any{e, u})
}

func (r *recorder) UsedElsewhere(ctx context.Context, e credential.Record, addr, action string) error {
	r.mu.Lock()
	r.elsewhereTries++
	hold := r.holdElsewhere
	r.mu.Unlock()
	defer func() {
		r.mu.Lock()
		r.elsewhereDone++
		r.mu.Unlock()
	}()
	if hold != nil {
		select {
		case <-hold:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	r.mu.Lock()
	if r.failElsewhere > 0 {
		r.failElsewhere--
		r.mu.Unlock()
		return errors.New("the API server is unavailable")
	}
	r.mu.Unlock()
	return r.note("elsewhere "+e.LeaseID+" "+addr+" "+action, e)
}

// elsewhere is how many UsedElsewheres were made and returned.
func (r *recorder) elsewhere() (tries, done int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.elsewhereTries, r.elsewhereDone
}

func (r *recorder) Withdraw(_ context.Context, e credential.Record) error {
	r.mu.Lock()
	if r.failWithdraw > 0 {
		r.failWithdraw--
		r.mu.Unlock()
		return errors.New("the API server is unavailable")
	}
	r.mu.Unlock()
	return r.note("withdraw "+e.LeaseID, e)
}

func (r *recorder) calls() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.log)
}

func (r *recorder) text() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return strings.Join(r.raw, "\n")
}

var _ issuer.UseRecorder = (*recorder)(nil)

type resolver struct {
	addrs []netip.Addr
	err   error
	asked int
}

func (r *resolver) Expected(context.Context, credential.Record) ([]netip.Addr, error) {
	r.asked++
	return r.addrs, r.err
}

// meter counts what the tracker tells the metrics.
type meter struct {
	mu     sync.Mutex
	counts map[string]int
	blind  map[string]bool
}

func (m *meter) add(k string, n int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.counts == nil {
		m.counts = map[string]int{}
	}
	m.counts[k] += n
}

func (m *meter) get(prefix string) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	n := 0
	for k, v := range m.counts {
		if strings.HasPrefix(k, prefix) {
			n += v
		}
	}
	return n
}

func (m *meter) Sessions(conn string, n int)       { m.add("sessions", n) }
func (m *meter) FirstUse(conn string)              { m.add("first", 1) }
func (m *meter) Foreign(conn, role, action string) { m.add("foreign "+action, 1) }
func (m *meter) NeverUsed(conn, role string)       { m.add("never "+role, 1) }
func (m *meter) Unused(conn, role string)          { m.add("unused "+role, 1) }
func (m *meter) Sampled(string, time.Duration)     { m.add("samples", 1) }

// isBlind is the blind gauge of conn.
func (m *meter) isBlind(conn string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.blind[conn]
}
func (m *meter) Blind(conn string, blind bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.blind == nil {
		m.blind = map[string]bool{}
	}
	m.blind[conn] = blind
}

// captureLogs sends klog's output to w until the returned func is called.
func captureLogs(w io.Writer) func() {
	klog.LogToStderr(false)
	klog.SetOutput(w)
	return func() {
		klog.Flush()
		klog.SetOutput(os.Stderr)
		klog.LogToStderr(true)
	}
}
