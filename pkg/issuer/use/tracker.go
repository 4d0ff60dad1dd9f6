package use

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"k8s.io/klog/v2"
	"k8s.io/utils/clock"

	"github.com/ephemeral-secrets/csi-driver/pkg/audit"
	"github.com/ephemeral-secrets/csi-driver/pkg/credential"
	pgengine "github.com/ephemeral-secrets/csi-driver/pkg/issuer/postgres"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider/postgres"
)

// Intervals.
const (
	DefaultInterval = time.Second
	MinInterval     = 100 * time.Millisecond
	// lastUsedEvery is how often, at most, LastUsedAt alone is written
	// to the record.
	lastUsedEvery = time.Minute
	// maxKnown bounds the addresses remembered per credential: beyond
	// credential.MaxSources they are only counted (Usage.Dropped). Past
	// it, a session from an address not remembered is counted once, when
	// it is first seen, and not recorded one by one.
	maxKnown = 64
	// foreignEvery is how often, at most, a credential's foreign uses
	// are reported (the audit record, the metric, the pod's Warning)
	// after its first, which is at once: the ones in between are counted
	// and told by the next report. onForeignUse revoke reports at once,
	// always (its report ends the credential).
	foreignEvery = time.Minute
	// sampleTimeout bounds one sample; actionTimeout one kill or write.
	sampleTimeout = 5 * time.Second
	actionTimeout = 10 * time.Second
)

// Local is the Source.Address of a session over a Unix socket (on the
// database's host): never expected.
const Local = "local"

// Options configure a Tracker. Engine is required.
type Options struct {
	Engine Engine
	// Interval is how often Run samples (default 1s, at least 100ms).
	Interval time.Duration
	// Recorder, when set, gets each change that matters (the cluster's
	// inventory); nil in-process.
	Recorder Recorder
	// Resolver, when set, tells a credential's pod's and node's
	// addresses; nil: the connection's expectedSources only.
	Resolver Resolver
	// Drop drops a killed credential's role (the issuer's drop, which
	// also forgets its pending status writes). Required for onForeignUse
	// revoke to drop the role; its sessions are ended and its logins
	// refused without it.
	Drop func(ctx context.Context, e credential.Record) error
	// WithdrawFiles, when set, withdraws a killed credential's files from
	// its pod (in-process: the node's lease manager). With a Recorder,
	// its Withdraw does (the node's watcher sees the record go).
	WithdrawFiles func(ctx context.Context, e credential.Record, reason string) error
	Audit         *audit.Logger
	Meter         Meter
	// Clock is the time (default the real clock).
	Clock clock.WithTicker
}

// Tracker keeps what was seen of every live credential's use. Sample and
// Run are not to be called at once; Usage may be, from anywhere. Its
// writes to the Recorder go off the sampling's path, coalesced per
// credential; Close drains them.
type Tracker struct {
	o Options

	mu     sync.Mutex
	conns  map[string]*connState
	writes *writer
}

// connState is what the tracker knows of one connection.
type connState struct {
	// blind is the last sample's outcome: the admin could not see other
	// roles' sessions, or the sample failed; said says a log line told it.
	blind, said bool
	// failures counts the blind or failed samples: a credential live
	// during one cannot be called unused.
	failures int
	creds    map[string]*cred // by lease ID
}

// cred is what the tracker knows of one live credential.
type cred struct {
	rec   credential.Record
	role  string // the configuration's role name
	usage credential.Usage
	// known are the addresses seen (bounded by maxKnown); counted are
	// the open sessions from an address not remembered (known was full)
	// already counted, so that they are counted once; overflowSaid: the
	// audit record said the addresses outgrew known.
	known        map[string]bool
	counted      map[sessionKey]bool
	overflowSaid bool
	// open are the sessions of the last sample; seen counts the new
	// sessions of its life.
	open map[sessionKey]bool
	seen int
	// late: first seen long after it was made (a new leader): its uses
	// before are not known. failuresAt is the connection's failures then.
	late       bool
	failuresAt int
	// expected are its pod's and node's addresses (resolved when its
	// first unlisted source came, and again, at most once an interval,
	// before a source is called foreign).
	expected    []netip.Addr
	resolved    bool
	resolvedAt  time.Time
	resolveSaid bool
	// written is the LastUsedAt last written to the record.
	written    time.Time
	unusedSaid bool
	// killing is a foreign address whose kill failed: tried again at
	// the next sample.
	killing string
	// reportedAt is when its last foreign use was reported (zero: none
	// yet); pending counts the foreign addresses seen since and not
	// reported, the first of them pendingAddr.
	reportedAt  time.Time
	pending     int
	pendingAddr string
}

type sessionKey struct {
	pid     int32
	started time.Time
}

// New returns a Tracker.
func New(o Options) *Tracker {
	if o.Interval <= 0 {
		o.Interval = DefaultInterval
	}
	o.Interval = max(o.Interval, MinInterval)
	if o.Clock == nil {
		o.Clock = clock.RealClock{}
	}
	if o.Meter == nil {
		o.Meter = noMeter{}
	}
	return &Tracker{o: o, conns: map[string]*connState{}, writes: newWriter(o.Recorder, o.Clock)}
}

// Run samples every Interval, the first time at once, until ctx is done;
// each run starts afresh (a new leader's term). When it returns (the
// leadership lost, or shutdown) the foreign uses it held back are
// reported, and its connections' blind gauges are reset: a tracker that
// no longer samples says nothing of what it cannot see.
func (t *Tracker) Run(ctx context.Context) {
	t.mu.Lock()
	t.conns = map[string]*connState{}
	t.mu.Unlock()
	defer t.stopped()
	tick := t.o.Clock.NewTicker(t.o.Interval)
	defer tick.Stop()
	for {
		_ = t.Sample(ctx) // told by the blind gauge and a log line at each change
		select {
		case <-ctx.Done():
			return
		case <-tick.C():
		}
	}
}

// stopped reports the foreign uses held back (the next term starts
// afresh, and never sees a session that ended meanwhile), then resets
// the blind gauge of every connection this term sampled. Run alone
// touches the creds: it calls stopped when it no longer samples.
func (t *Tracker) stopped() {
	t.mu.Lock()
	conns := maps.Clone(t.conns)
	t.mu.Unlock()
	for conn, cs := range conns {
		for _, c := range cs.creds {
			t.reportHeldBack(context.Background(), conn, cs, c)
		}
		t.o.Meter.Blind(conn, false)
	}
}

// Close writes what is still queued for the Recorder (for a few
// seconds at most) and stops its writers.
func (t *Tracker) Close() { t.writes.close(5 * time.Second) }

// Usage is what was seen of the use of the live credential of leaseID.
func (t *Tracker) Usage(leaseID string) (credential.Usage, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, cs := range t.conns {
		if c := cs.creds[leaseID]; c != nil {
			return c.snapshot(cs), true
		}
	}
	return credential.Usage{}, false
}

// Sample looks once at every connection's sessions and acts on what is
// new. Its error joins those of the connections it could not sample.
func (t *Tracker) Sample(ctx context.Context) error {
	var errs []error
	for _, conn := range t.o.Engine.Connections() {
		if err := t.sampleConn(ctx, conn); err != nil {
			errs = append(errs, fmt.Errorf("connection %q: %w", conn, err))
		}
	}
	return errors.Join(errs...)
}

func (t *Tracker) sampleConn(ctx context.Context, conn string) error {
	start := t.o.Clock.Now()
	sctx, cancel := context.WithTimeout(ctx, sampleTimeout)
	s, err := t.o.Engine.SampleSessions(sctx, conn)
	cancel()
	t.o.Meter.Sampled(conn, t.o.Clock.Since(start))
	t.mu.Lock()
	cs := t.conns[conn]
	if cs == nil {
		cs = &connState{creds: map[string]*cred{}}
		t.conns[conn] = cs
	}
	t.mu.Unlock()
	if err != nil {
		if ctx.Err() == nil {
			t.setBlind(conn, cs, true, err)
		}
		return err
	}
	t.setBlind(conn, cs, !s.Visible, nil)
	now := t.o.Clock.Now()
	live := make(map[string]bool, len(s.Roles))
	for _, r := range s.Roles {
		live[r.Tag.LeaseID] = true
		t.mu.Lock()
		c := cs.creds[r.Tag.LeaseID]
		if c == nil {
			c = t.newCred(conn, cs, r, now)
			cs.creds[r.Tag.LeaseID] = c
		}
		t.mu.Unlock()
		t.observe(ctx, conn, cs, c, r, now)
	}
	for lease, c := range cs.creds {
		if !live[lease] {
			t.summarise(ctx, conn, cs, c)
			t.mu.Lock()
			delete(cs.creds, lease)
			t.mu.Unlock()
		}
	}
	return nil
}

// setBlind records whether conn's sessions could be seen, and says so at
// each change.
func (t *Tracker) setBlind(conn string, cs *connState, blind bool, err error) {
	t.o.Meter.Blind(conn, blind)
	t.mu.Lock()
	changed := !cs.said || cs.blind != blind
	cs.blind, cs.said = blind, true
	if blind {
		cs.failures++
	}
	t.mu.Unlock()
	if !changed {
		return
	}
	switch {
	case err != nil:
		klog.ErrorS(err, "Cannot sample the sessions of the issued roles: their use is not seen, and no credential is called unused meanwhile",
			"connection", conn)
	case blind:
		klog.ErrorS(nil, "The admin cannot see other roles' sessions (it is neither a superuser nor a member of pg_read_all_stats): "+
			"no use, source or foreign use is seen, and no credential is called unused; run GRANT pg_read_all_stats TO <the admin role>",
			"connection", conn)
	default:
		klog.InfoS("Sampling the sessions of the issued roles", "connection", conn, "interval", t.o.Interval)
	}
}

func (t *Tracker) newCred(conn string, cs *connState, r pgengine.SampledRole, now time.Time) *cred {
	_, role, _ := strings.Cut(r.Tag.Role, "/")
	c := &cred{
		rec: credential.Record{
			LeaseID: r.Tag.LeaseID, VolumeID: r.Tag.Volume, Pod: r.Tag.Pod, Node: r.Tag.Node, Class: r.Tag.Class, Provider: postgres.Name,
			Role: r.Tag.Role, Name: r.Name, IssuedAt: r.Tag.Created,
		},
		role: role, known: map[string]bool{}, counted: map[sessionKey]bool{}, open: map[sessionKey]bool{},
		failuresAt: cs.failures,
		// A role made before the last interval (and a second of the
		// tag's rounding) was live before this tracker looked.
		late: now.Sub(r.Tag.Created) > 3*t.o.Interval+2*time.Second,
	}
	if cs.blind {
		c.failuresAt-- // this very sample was blind
	}
	return c
}

// snapshot is c's usage now; Sampled says whether every sample of its
// life (as far as this tracker saw it) could see its sessions.
func (c *cred) snapshot(cs *connState) credential.Usage {
	u := c.usage
	u.Sources = slices.Clone(u.Sources)
	u.Sampled = !c.late && cs.failures == c.failuresAt
	return u
}

// observe takes in one sample of c's role r.
func (t *Tracker) observe(ctx context.Context, conn string, cs *connState, c *cred, r pgengine.SampledRole, now time.Time) {
	t.mu.Lock()
	open := make(map[sessionKey]bool, len(r.Sessions))
	fresh := 0
	for _, s := range r.Sessions {
		k := sessionKey{s.PID, s.Started}
		open[k] = true
		if !c.open[k] {
			fresh++
		}
	}
	c.open = open
	c.seen += fresh
	t.mu.Unlock()
	for k := range c.counted {
		if !open[k] {
			delete(c.counted, k)
		}
	}
	if fresh > 0 {
		t.o.Meter.Sessions(conn, fresh)
	}
	if c.killing != "" {
		t.kill(ctx, conn, c, c.killing)
	}
	if len(r.Sessions) == 0 {
		t.checkUnused(conn, cs, c, now)
		t.reportForeign(ctx, conn, cs, c, nil, now)
		return
	}
	// The addresses not seen before, in the order their sessions began;
	// each is classed before anything is recorded of it. Those past the
	// addresses remembered (untracked) are counted once per session.
	sessions := slices.Clone(r.Sessions)
	slices.SortFunc(sessions, func(a, b pgengine.Session) int { return a.Started.Compare(b.Started) })
	var sources []newSource
	room := maxKnown - len(c.known)
	for _, s := range sessions {
		if s.Hidden() {
			continue
		}
		addr := s.Addr
		if addr == "" {
			addr = Local
		}
		k := sessionKey{s.PID, s.Started}
		if c.known[addr] || c.counted[k] {
			continue
		}
		if i := slices.IndexFunc(sources, func(n newSource) bool { return n.addr == addr }); i >= 0 {
			if sources[i].untracked {
				c.counted[k] = true
			}
			continue
		}
		foreign, err := t.foreign(ctx, conn, c, addr)
		if err != nil {
			// Classed at a later sample, while the session is open; said
			// once per credential.
			if !c.resolveSaid && !errors.Is(err, ErrNoPodAddress) {
				c.resolveSaid = true
				klog.ErrorS(err, "Reading the addresses a credential is expected to be used from; its new sources wait",
					"lease", c.rec.LeaseID, "pod", c.rec.Pod.Namespace+"/"+c.rec.Pod.Name)
			}
			break
		}
		n := newSource{addr: addr, started: s.Started, foreign: foreign, untracked: room <= 0}
		if n.untracked {
			c.counted[k] = true
		}
		room--
		sources = append(sources, n)
	}

	t.mu.Lock()
	first := c.usage.FirstUsedAt.IsZero()
	if first {
		// The earliest session's start, when the admin may see it (the
		// login itself), else now.
		c.usage.FirstUsedAt = now
		if st := sessions[0].Started; !st.IsZero() && st.Before(now) {
			c.usage.FirstUsedAt = st
		}
	}
	c.usage.LastUsedAt = now
	c.usage.Sessions = max(c.usage.Sessions, len(r.Sessions))
	for _, n := range sources {
		c.addSource(n, now)
	}
	// An address past those remembered only adds to Dropped: written
	// with the next write, not one write each.
	tracked := slices.ContainsFunc(sources, func(n newSource) bool { return !n.untracked })
	write := first || tracked || now.Sub(c.written) >= lastUsedEvery
	if write {
		c.written = now
	}
	u := c.snapshot(cs)
	t.mu.Unlock()

	others := sources // the new addresses but the first use's
	if first {
		t.o.Meter.FirstUse(conn)
		d := &audit.UseDetail{Event: audit.UseFirst, Usage: &u}
		detail := "first use"
		if len(sources) > 0 && sources[0].started.Equal(sessions[0].Started) {
			d.Source, d.Foreign = sources[0].addr, sources[0].foreign
			detail += " from " + describe(sources[0].addr, sources[0].foreign)
			others = sources[1:]
		} else if sessions[0].Hidden() {
			detail += " (its address is not visible to the admin)"
		}
		t.audit(c, detail, audit.Success, "", d)
	}
	for _, n := range others {
		switch {
		case !n.untracked:
			t.audit(c, "used from a new address: "+describe(n.addr, n.foreign), audit.Success, "",
				&audit.UseDetail{Event: audit.UseSource, Source: n.addr, Foreign: n.foreign, Usage: &u})
		case !c.overflowSaid:
			c.overflowSaid = true
			t.audit(c, fmt.Sprintf("used from more addresses than are remembered (%d); this one is %s, and the next new ones are only counted (droppedSources), not recorded one by one",
				maxKnown, describe(n.addr, n.foreign)), audit.Success, "",
				&audit.UseDetail{Event: audit.UseSource, Source: n.addr, Foreign: n.foreign, Usage: &u})
		}
	}
	if write {
		t.writes.used(c.rec, u)
	}
	t.reportForeign(ctx, conn, cs, c, sources, now)
}

// newSource is an address of a credential's sessions not seen before;
// untracked when the credential's remembered addresses are full.
type newSource struct {
	addr      string
	started   time.Time
	foreign   bool
	untracked bool
}

// reportForeign reports c's foreign uses: the foreign ones of sources
// and those held back before. The first report is made at once; the next
// ones at most once per foreignEvery, each telling how many foreign
// addresses came since the last. onForeignUse revoke reports (and kills)
// at once, always.
func (t *Tracker) reportForeign(ctx context.Context, conn string, cs *connState, c *cred, sources []newSource, now time.Time) {
	for _, n := range sources {
		if n.foreign {
			if c.pending == 0 {
				c.pendingAddr = n.addr
			}
			c.pending++
		}
	}
	if c.pending == 0 {
		return
	}
	action := t.action(conn, c)
	if !c.reportedAt.IsZero() && now.Sub(c.reportedAt) < foreignEvery && action != pgengine.ForeignRevoke {
		return
	}
	t.mu.Lock()
	u := c.snapshot(cs)
	t.mu.Unlock()
	t.foreignUse(ctx, conn, c, c.pendingAddr, c.pending-1, action, u)
	c.reportedAt, c.pending, c.pendingAddr = now, 0, ""
}

func describe(addr string, foreign bool) string {
	if foreign {
		return addr + " (foreign: none expected)"
	}
	return addr + " (expected)"
}

// addSource remembers n's address (unless untracked), listing it while
// Sources has room, else counting it (Dropped).
func (c *cred) addSource(n newSource, now time.Time) {
	if !n.untracked {
		c.known[n.addr] = true
	}
	if len(c.usage.Sources) >= credential.MaxSources {
		c.usage.Dropped++
		return
	}
	started := n.started
	if started.IsZero() || started.After(now) {
		started = now
	}
	c.usage.Sources = append(c.usage.Sources, credential.Source{Address: n.addr, FirstSeen: started, Foreign: n.foreign})
}

// foreign classes addr for c: expected when in the connection's
// expectedSources, else when one of its pod's or node's addresses (asked
// of the Resolver once per credential, and only for an address the
// networks do not cover).
func (t *Tracker) foreign(ctx context.Context, conn string, c *cred, addr string) (bool, error) {
	if addr == Local {
		return true, nil
	}
	a, err := netip.ParseAddr(addr)
	if err != nil {
		return true, nil // not an address PostgreSQL would give: nobody expects it
	}
	a = a.Unmap()
	if cfg, _, err := t.o.Engine.Lookup(conn, c.role); err == nil {
		for _, p := range cfg.Expected() {
			if p.Contains(a) {
				return false, nil
			}
		}
	}
	if t.o.Resolver == nil {
		return true, nil
	}
	known := func() bool { return slices.ContainsFunc(c.expected, func(e netip.Addr) bool { return e.Unmap() == a }) }
	// Asked once, and again (at most once an interval) before an address
	// is called foreign: a pod's IPs come after its credential, and change
	// with its sandbox.
	now := t.o.Clock.Now()
	if !c.resolved || !known() && now.Sub(c.resolvedAt) >= t.o.Interval {
		rctx, cancel := context.WithTimeout(ctx, actionTimeout)
		addrs, err := t.o.Resolver.Expected(rctx, c.rec)
		cancel()
		switch {
		case errors.Is(err, ErrNoPodAddress) && now.Sub(c.rec.IssuedAt) < PodAddressWait:
			return false, err // its sources wait for the pod's IPs
		case err != nil && !errors.Is(err, ErrNoPodAddress):
			return false, err
		}
		c.expected, c.resolved, c.resolvedAt = addrs, true, now
	}
	return !known(), nil
}

// action is what c's role says to do on a foreign use (alert when the
// configuration no longer has the role).
func (t *Tracker) action(conn string, c *cred) string {
	if _, r, err := t.o.Engine.Lookup(conn, c.role); err == nil && r.OnForeignUse != "" {
		return r.OnForeignUse
	}
	return pgengine.ForeignAlert
}

// foreignUse acts on c's use from addr, which none expected, and from
// more such addresses since its last report. The pod's Warning is sent
// off the sampling's path (and tried again when it fails).
func (t *Tracker) foreignUse(ctx context.Context, conn string, c *cred, addr string, more int, action string, u credential.Usage) {
	t.o.Meter.Foreign(conn, c.role, action)
	klog.InfoS("A credential was used from an address none expected", "lease", c.rec.LeaseID,
		"pod", c.rec.Pod.Namespace+"/"+c.rec.Pod.Name, "address", addr, "moreAddresses", more, "action", action)
	detail := "foreign use from " + addr
	if more > 0 {
		detail += fmt.Sprintf(" and %d more addresses none expected", more)
	}
	t.audit(c, detail+": "+action, audit.Success, "",
		&audit.UseDetail{Event: audit.UseForeign, Source: addr, Foreign: true, Action: action, Usage: &u})
	if action != pgengine.ForeignRecord {
		t.writes.usedElsewhere(c.rec, addr, action)
	}
	if action == pgengine.ForeignRevoke {
		t.kill(ctx, conn, c, addr)
	}
}

// kill ends c for its use from addr: its sessions first (its logins
// refused, so the thief cannot come back), then its record (the kill
// switch: its tombstone, the node's watcher withdraws the files) or, in
// the driver's process, its files, then its role. A failure is tried
// again at the next sample.
func (t *Tracker) kill(ctx context.Context, conn string, c *cred, addr string) {
	ctx, cancel := context.WithTimeout(ctx, actionTimeout)
	defer cancel()
	reason := "used from " + addr + ", an address none expected"
	ended, err := t.o.Engine.EndSessions(ctx, conn, c.rec.Name, c.rec.LeaseID)
	steps := []string{fmt.Sprintf("%d sessions ended", ended)}
	var errs []error
	if err != nil {
		errs = append(errs, fmt.Errorf("ending its sessions: %w", err))
	}
	switch {
	case t.o.Recorder != nil:
		if err := t.o.Recorder.Withdraw(ctx, c.rec); err != nil && !errors.Is(err, credential.ErrRecordGone) {
			errs = append(errs, fmt.Errorf("withdrawing its record: %w", err))
		} else {
			steps = append(steps, "record withdrawn")
		}
	case t.o.WithdrawFiles != nil:
		if err := t.o.WithdrawFiles(ctx, c.rec, reason); err != nil {
			errs = append(errs, fmt.Errorf("withdrawing its files: %w", err))
		} else {
			steps = append(steps, "files withdrawn")
		}
	}
	// The role is dropped only once the withdrawal held: a dropped role
	// leaves the samples, and with it the retry of a withdrawal that
	// failed, and the volume would be issued a credential again. Until
	// then the role stays, unable to log in (EndSessions), and is killed
	// again at the next sample.
	if t.o.Drop != nil && len(errs) == 0 {
		if err := t.o.Drop(ctx, c.rec); err != nil {
			errs = append(errs, fmt.Errorf("dropping its role: %w", err))
		} else {
			steps = append(steps, "role dropped")
		}
	}
	err = errors.Join(errs...)
	outcome, msg := audit.Success, ""
	if err != nil {
		outcome, msg = audit.Error, err.Error()
		c.killing = addr
		klog.ErrorS(err, "Killing a credential used from an address none expected; trying again", "lease", c.rec.LeaseID,
			"pod", c.rec.Pod.Namespace+"/"+c.rec.Pod.Name, "address", addr)
	} else {
		c.killing = ""
		klog.InfoS("Killed a credential used from an address none expected", "lease", c.rec.LeaseID,
			"pod", c.rec.Pod.Namespace+"/"+c.rec.Pod.Name, "address", addr, "sessionsEnded", ended)
	}
	t.audit(c, "killed ("+reason+"): "+strings.Join(steps, ", "), outcome, msg,
		&audit.UseDetail{Event: audit.UseKill, Source: addr, Foreign: true, Action: pgengine.ForeignRevoke})
}

// checkUnused says, once, that c went unused past its role's
// unusedAfter, when every sample of its life could see.
func (t *Tracker) checkUnused(conn string, cs *connState, c *cred, now time.Time) {
	if c.unusedSaid || !c.usage.FirstUsedAt.IsZero() {
		return
	}
	_, r, err := t.o.Engine.Lookup(conn, c.role)
	if err != nil || r.UnusedAfter.Duration <= 0 || now.Sub(c.rec.IssuedAt) < r.UnusedAfter.Duration {
		return
	}
	t.mu.Lock()
	u := c.snapshot(cs)
	t.mu.Unlock()
	if !u.Sampled {
		return // not known
	}
	c.unusedSaid = true
	t.o.Meter.Unused(conn, c.role)
	t.audit(c, "not used within its role's unusedAfter ("+r.UnusedAfter.Duration.String()+"): the pod may not need this access",
		audit.Success, "", &audit.UseDetail{Event: audit.UseUnused, Usage: &u})
}

// reportHeldBack reports c's foreign uses held back since its last
// report, when nothing is left to kill (its role is gone) or nobody
// will (the tracker stops): revoke holds none back.
func (t *Tracker) reportHeldBack(ctx context.Context, conn string, cs *connState, c *cred) {
	if action := t.action(conn, c); c.pending > 0 && action != pgengine.ForeignRevoke {
		t.mu.Lock()
		u := c.snapshot(cs)
		t.mu.Unlock()
		t.foreignUse(ctx, conn, c, c.pendingAddr, c.pending-1, action, u)
		c.pending, c.pendingAddr = 0, ""
	}
}

// summarise writes c's summary: its role is gone. The foreign uses held
// back since its last report are reported first (nothing is left to
// kill).
func (t *Tracker) summarise(ctx context.Context, conn string, cs *connState, c *cred) {
	t.reportHeldBack(ctx, conn, cs, c)
	t.mu.Lock()
	u := c.snapshot(cs)
	seen := c.seen
	t.mu.Unlock()
	var detail string
	switch {
	case !u.FirstUsedAt.IsZero():
		addrs := make([]string, len(u.Sources))
		for i, s := range u.Sources {
			addrs[i] = s.Address
		}
		detail = fmt.Sprintf("revoked; used: %d sessions seen, first %s, last %s, from %s", seen,
			u.FirstUsedAt.UTC().Format(time.RFC3339), u.LastUsedAt.UTC().Format(time.RFC3339), strings.Join(addrs, ", "))
		if u.Dropped > 0 {
			detail += fmt.Sprintf(" and %d more", u.Dropped)
		}
	case u.Sampled:
		detail = "revoked; never used"
		t.o.Meter.NeverUsed(conn, c.role)
	default:
		detail = "revoked; no use seen, but its sessions could not always be seen (the admin's privilege, a failed sample, or a new leader): whether it was used is not known"
	}
	t.audit(c, detail, audit.Success, "", &audit.UseDetail{Event: audit.UseSummary, Usage: &u})
	t.writes.used(c.rec, u)
}

// audit writes a record of stage use of c.
func (t *Tracker) audit(c *cred, detail, outcome, errText string, d *audit.UseDetail) {
	r := audit.Of(c.rec)
	r.Stage, r.Outcome, r.Error, r.Detail, r.Use = audit.Use, outcome, errText, detail, d
	if err := t.o.Audit.Log(r); err != nil {
		klog.ErrorS(err, "Writing the audit log")
	}
}

type noMeter struct{}

func (noMeter) Sessions(string, int)           {}
func (noMeter) FirstUse(string)                {}
func (noMeter) Foreign(string, string, string) {}
func (noMeter) NeverUsed(string, string)       {}
func (noMeter) Unused(string, string)          {}
func (noMeter) Blind(string, bool)             {}
func (noMeter) Sampled(string, time.Duration)  {}
