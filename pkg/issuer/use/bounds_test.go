package use_test

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/ephemeral-secrets/csi-driver/pkg/audit"
	"github.com/ephemeral-secrets/csi-driver/pkg/credential"
	pgengine "github.com/ephemeral-secrets/csi-driver/pkg/issuer/postgres"
	"github.com/ephemeral-secrets/csi-driver/pkg/issuer/use"
)

// only are the records of rs whose event (events') is event.
func only(rs []audit.Record, event string) []audit.Record {
	return slices.DeleteFunc(slices.Clone(rs), func(r audit.Record) bool { return events([]audit.Record{r})[0] != event })
}

// A credential stolen and used from more addresses than the tracker
// remembers (64) is still told in bounded terms: its first foreign use at
// once, the next ones at most once a minute (telling how many came
// since), each session from an address past those remembered counted
// once (droppedSources) however many samples see it, and one record that
// the addresses outgrew the tracker's memory; nothing per session per
// sample (the audit trail, the pod's events, the record's writes).
func TestManyForeignSourcesAreBounded(t *testing.T) {
	ctx := context.Background()
	w := newWorld(t, setup{onForeignUse: "alert", recorder: true})
	id := "team-m-manysrcs"
	l := w.issue(id, "m")
	const batch, addrs = 14, 70 // 5 batches, past the 64 remembered
	var open []*pgx.Conn
	for i := 0; i < addrs; i += batch {
		for _, c := range open {
			_ = c.Close(ctx)
		}
		open = open[:0]
		for j := i; j < i+batch; j++ {
			open = append(open, w.login(l, thieves(j)))
		}
		w.sample(time.Second)
		if i == 0 {
			foreign := only(w.records(id), "foreign:alert")
			if len(foreign) != 1 || !strings.Contains(foreign[0].Detail, fmt.Sprintf("and %d more addresses none expected", batch-1)) {
				t.Fatalf("after the first sample of %d foreign addresses: %d foreign reports, want 1 at once, telling the others", batch, len(foreign))
			}
		}
	}
	// The last batch stays open: 8 of its addresses are remembered, 6 are
	// not; the samples that see them again count nothing more.
	for range 5 {
		w.sample(time.Second)
	}
	want := addrs - 8 // credential.MaxSources are listed
	u, _ := w.tracker.Usage(id)
	if len(u.Sources) != 8 || u.Dropped != want {
		t.Errorf("%d sources listed, %d dropped; want 8 and %d", len(u.Sources), u.Dropped, want)
	}
	rs := w.records(id)
	if n := len(only(rs, "foreign:alert")); n != 1 {
		t.Errorf("%d foreign reports within a minute of the first, want 1", n)
	}
	sources := only(rs, "source")
	if len(sources) != 64 || !strings.Contains(sources[63].Detail, "more addresses than are remembered (64)") {
		t.Errorf("%d source records (want 63 and one that the addresses outgrew the memory); the last: %q", len(sources), sources[len(sources)-1].Detail)
	}

	// A minute after the first report, one tells the rest.
	w.sample(time.Minute)
	for range 5 {
		w.sample(time.Second)
	}
	foreign := only(w.records(id), "foreign:alert")
	if len(foreign) != 2 || !strings.Contains(foreign[1].Detail, fmt.Sprintf("and %d more addresses none expected", addrs-batch-1)) {
		t.Fatalf("%d foreign reports, want 2; the last: %q", len(foreign), foreign[len(foreign)-1].Detail)
	}
	if foreign[0].Use.Source != thieves(0) || foreign[1].Use.Source != thieves(batch) {
		t.Errorf("the reports name %s and %s, want %s and %s", foreign[0].Use.Source, foreign[1].Use.Source, thieves(0), thieves(batch))
	}
	if u, _ := w.tracker.Usage(id); u.Dropped != want {
		t.Errorf("%d dropped after more samples, want %d", u.Dropped, want)
	}

	// One more thief within the minute is held back, then told when the
	// role goes, before its summary.
	w.login(l, thieves(addrs))
	w.sample(time.Second)
	if n := len(only(w.records(id), "foreign:alert")); n != 2 {
		t.Errorf("%d foreign reports within a minute of the last, want 2", n)
	}
	if err := w.node.Revoke(ctx, leaseOf(l, id)); err != nil {
		t.Fatal(err)
	}
	w.sample(time.Second)
	got := events(w.records(id))
	if !slices.Equal(got[len(got)-2:], []string{"foreign:alert", "summary"}) || len(only(w.records(id), "foreign:alert")) != 3 {
		t.Errorf("records end %v, want the held-back foreign use told before the summary", got[len(got)-2:])
	}
	w.tracker.Close()
	warned := slices.DeleteFunc(w.rec.calls(), func(c string) bool { return !strings.HasPrefix(c, "elsewhere ") })
	if !slices.Equal(warned, []string{"elsewhere " + id + " " + thieves(0) + " alert", "elsewhere " + id + " " + thieves(batch) + " alert",
		"elsewhere " + id + " " + thieves(addrs) + " alert"}) {
		t.Errorf("the pod was warned %v, want of the three reports", warned)
	}
	if n := w.meter.get("foreign alert"); n != 3 {
		t.Errorf("the foreign metric counted %d, want 3", n)
	}
}

// With onForeignUse revoke, a foreign use is acted on at once even within
// a minute of the last report (here the role's action became revoke
// meanwhile): a kill is never held back.
func TestRevokeIsNeverHeldBack(t *testing.T) {
	ctx := context.Background()
	w := newWorld(t, setup{onForeignUse: "alert", recorder: true})
	eng := &actionEngine{Admin: w.admin, action: "alert"}
	w.tracker = use.New(use.Options{Engine: eng, Clock: w.clock, Meter: w.meter, Audit: audit.New(lockedWriter{w.audit, w.auditMu}),
		Recorder: w.rec, Drop: func(ctx context.Context, e credential.Record) error {
			_, err := w.admin.Drop(ctx, "main", e.Name, e.LeaseID, nil)
			return err
		}})
	t.Cleanup(w.tracker.Close)
	id := "team-m-revokenow"
	l := w.issue(id, "m")
	w.login(l, thieves(200))
	w.sample(time.Second)
	eng.set("revoke")
	w.login(l, thieves(201))
	w.sample(time.Second)
	if got := events(w.records(id)); !slices.Contains(got, "foreign:revoke") || !slices.Contains(got, "kill:revoke") {
		t.Fatalf("records %v, want the foreign use and the kill at once", got)
	}
	if exists, err := pg.RoleExists(ctx, l.Values["username"]); err != nil || exists {
		t.Errorf("after the kill, the role exists: %v %v", exists, err)
	}
}

// actionEngine is the issuer's engine whose roles' onForeignUse is
// action.
type actionEngine struct {
	*pgengine.Admin
	mu     sync.Mutex
	action string
}

func (e *actionEngine) set(action string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.action = action
}

func (e *actionEngine) Lookup(connection, role string) (*pgengine.Connection, *pgengine.Role, error) {
	c, r, err := e.Admin.Lookup(connection, role)
	if err != nil {
		return c, r, err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	cp := *r
	cp.OnForeignUse = e.action
	return c, &cp, nil
}

// The pod's Warning of a foreign use is sent off the sampling's path: a
// sample never waits for the API server, and one that fails is tried
// again, with backoff, a bounded number of times, and sent once.
func TestForeignUseWarning(t *testing.T) {
	for _, tc := range []struct {
		name      string
		fail      int
		tries     int
		delivered bool
	}{
		{name: "sent", tries: 1, delivered: true},
		{name: "retried", fail: 2, tries: 3, delivered: true},
		{name: "given up", fail: 100, tries: 5},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := newWorld(t, setup{onForeignUse: "alert", recorder: true})
			w.rec.failElsewhere = tc.fail
			id := "team-w-" + strings.ReplaceAll(tc.name, " ", "")
			l := w.issue(id, "w")
			w.login(l, thief)
			w.sample(time.Second)
			// The retries wait on the tracker's clock: step it until the
			// tries are all made (a real deadline against a hang).
			deadline := time.Now().Add(20 * time.Second)
			for {
				if tries, done := w.rec.elsewhere(); tries == tc.tries && done == tries {
					break
				}
				if time.Now().After(deadline) {
					tries, _ := w.rec.elsewhere()
					t.Fatalf("%d tries to warn the pod, want %d", tries, tc.tries)
				}
				w.clock.Step(time.Second)
				time.Sleep(5 * time.Millisecond)
			}
			for range 60 { // no more tries
				w.clock.Step(time.Second)
				time.Sleep(time.Millisecond)
			}
			w.tracker.Close()
			if tries, _ := w.rec.elsewhere(); tries != tc.tries {
				t.Errorf("%d tries to warn the pod, want %d", tries, tc.tries)
			}
			n := 0
			for _, c := range w.rec.calls() {
				if c == "elsewhere "+id+" "+thief+" alert" {
					n++
				}
			}
			if n != map[bool]int{true: 1}[tc.delivered] {
				t.Errorf("the Warning was sent %d times, want it delivered: %v", n, tc.delivered)
			}
			_ = w.node.Revoke(context.Background(), leaseOf(l, id))
		})
	}

	t.Run("not waited for", func(t *testing.T) {
		w := newWorld(t, setup{onForeignUse: "alert", recorder: true})
		hold := make(chan struct{})
		w.rec.holdElsewhere = hold
		id := "team-w-notwaited"
		l := w.issue(id, "w")
		w.login(l, thief)
		w.sample(time.Second)
		if _, done := w.rec.elsewhere(); done != 0 {
			t.Errorf("the sample waited for the Warning (%d returned before it ended)", done)
		}
		if got := events(w.records(id)); !slices.Contains(got, "foreign:alert") {
			t.Errorf("records %v: the foreign use is not recorded at once", got)
		}
		close(hold)
		w.tracker.Close()
		if !slices.Contains(w.rec.calls(), "elsewhere "+id+" "+thief+" alert") {
			t.Errorf("the Warning was not sent: %v", w.rec.calls())
		}
		_ = w.node.Revoke(context.Background(), leaseOf(l, id))
	})
}

// A tracker that stops (its leadership lost, or shutdown) resets the
// blind gauge it set: a former leader does not go on saying it is blind.
func TestRunEndResetsTheBlindGauge(t *testing.T) {
	ctx := context.Background()
	if err := pg.Exec(ctx, `CREATE ROLE csi_blind_run LOGIN CREATEROLE PASSWORD 'blind-run-admin'`); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pg.Exec(ctx, `DROP ROLE IF EXISTS csi_blind_run`) })
	w := newWorld(t, setup{admin: pg.URL("csi_blind_run", "blind-run-admin")})
	rctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { defer close(done); w.tracker.Run(rctx) }()
	deadline := time.Now().Add(10 * time.Second)
	for !w.meter.isBlind("main") {
		if time.Now().After(deadline) {
			t.Fatal("the blind gauge was never set")
		}
		time.Sleep(5 * time.Millisecond)
	}
	cancel()
	<-done
	if w.meter.isBlind("main") {
		t.Error("the blind gauge is still set after Run returned")
	}
}

// A foreign use held back (within a minute of the credential's last
// report) is reported when the tracker stops (its leadership lost, or
// shutdown), not lost: the next leader starts afresh and never sees a
// session that ended meanwhile.
func TestHeldBackForeignUseIsReportedWhenRunStops(t *testing.T) {
	ctx := context.Background()
	w := newWorld(t, setup{onForeignUse: "alert"})
	id := "team-m-heldback"
	l := w.issue(id, "m")
	w.login(l, thieves(0))
	rctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { defer close(done); w.tracker.Run(rctx) }()
	defer func() { cancel(); <-done }()
	waitUntil := func(what string, ok func() bool, step bool) {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for steps := 0; !ok(); steps++ {
			if time.Now().After(deadline) {
				t.Fatalf("never saw %s", what)
			}
			// A sample a second, half a minute at most: well within a
			// minute of the first report.
			if step && steps < 30 {
				w.clock.Step(time.Second)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	waitUntil("the first foreign use reported", func() bool { return len(only(w.records(id), "foreign:alert")) == 1 }, false)
	second := w.login(l, thieves(1))
	waitUntil("the second foreign address", func() bool {
		return slices.ContainsFunc(only(w.records(id), "source"), func(r audit.Record) bool { return r.Use.Source == thieves(1) })
	}, true)
	if n := len(only(w.records(id), "foreign:alert")); n != 1 {
		t.Fatalf("%d foreign reports within a minute of the first, want 1 (the second held back)", n)
	}
	_ = second.Close(ctx)
	cancel()
	<-done
	foreign := only(w.records(id), "foreign:alert")
	if len(foreign) != 2 || foreign[1].Use.Source != thieves(1) {
		t.Errorf("after Run stopped: %d foreign reports (%v), want 2, the second from %s", len(foreign), events(foreign), thieves(1))
	}
	_ = w.node.Revoke(ctx, leaseOf(l, id))
}
