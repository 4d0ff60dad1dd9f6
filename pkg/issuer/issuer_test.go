package issuer

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/ephemeral-secrets/csi-driver/pkg/credential"
	pgengine "github.com/ephemeral-secrets/csi-driver/pkg/issuer/postgres"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider/postgres"
	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/pgtest"
)

var pg *pgtest.Server

func TestMain(m *testing.M) { pgtest.Main(m, &pg) }

const create = `CREATE ROLE "{{.Name}}" LOGIN PASSWORD '{{.Password}}' VALID UNTIL '{{.Expiration}}'`

// clock is a settable time: the zero offset is the real time.
type clock struct {
	mu     sync.Mutex
	offset time.Duration
}

func (c *clock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return time.Now().Add(c.offset)
}

func (c *clock) advance(d time.Duration) {
	c.mu.Lock()
	c.offset += d
	c.mu.Unlock()
}

func config(roles map[string]*pgengine.Role) pgengine.Config {
	return pgengine.Config{Connections: map[string]*pgengine.Connection{"main": {URL: pg.AdminURL(), Roles: roles}}}
}

func newIssuer(t *testing.T, o Options) (*Issuer, *clock) {
	t.Helper()
	c := &clock{}
	if o.Now == nil {
		o.Now = c.now
	}
	if o.Config.Connections == nil {
		o.Config = config(map[string]*pgengine.Role{
			"app": {CreationStatements: []string{create}, Allowed: []pgengine.Subject{{Namespace: "team", ServiceAccount: "app"}}},
		})
	}
	iss, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(iss.Close)
	return iss, c
}

// as is the Issuer as a node of a given name sees it.
type as struct {
	i *Issuer
	c Caller
}

func (a as) Mint(ctx context.Context, r postgres.MintRequest) (postgres.Grant, error) {
	return a.i.Mint(ctx, a.c, r)
}

func (a as) Extend(ctx context.Context, r postgres.ExtendRequest) (postgres.Grant, error) {
	return a.i.Extend(ctx, a.c, r)
}

func (a as) Drop(ctx context.Context, r postgres.DropRequest) error { return a.i.Drop(ctx, a.c, r) }

var appParams = map[string]string{postgres.ConnectionParam: "main", postgres.RoleParam: "app"}

func appPod(name string) provider.Pod {
	return provider.Pod{Namespace: "team", Name: name, UID: "uid-" + name, ServiceAccount: "app"}
}

func issue(ctx context.Context, p *postgres.Provider, id string, pod provider.Pod) (provider.Lease, error) {
	l, err := p.Issue(ctx, provider.Request{LeaseID: id, Class: "team/db", Params: appParams, Pod: pod})
	l.ID, l.Params, l.Provider = id, appParams, postgres.Name
	return l, err
}

func login(ctx context.Context, l provider.Lease) (*pgx.Conn, error) {
	return pgx.Connect(ctx, pg.URL(l.Values["username"], l.Values["password"]))
}

func exists(t *testing.T, name string) bool {
	t.Helper()
	ok, err := pg.RoleExists(context.Background(), name)
	if err != nil {
		t.Fatal(err)
	}
	return ok
}

// inventory is an Inventory in memory. Its records are written as they
// are asked for, unless before (when set) says otherwise: it runs first
// in Issuing, and its error fails the write.
type inventory struct {
	mu      sync.Mutex
	entries map[string]credential.Record
	states  map[string]string
	issued  int // calls of Issued
	before  func(ctx context.Context, e credential.Record) error
}

func newInventory() *inventory {
	return &inventory{entries: map[string]credential.Record{}, states: map[string]string{}}
}

func (v *inventory) Issuing(ctx context.Context, e credential.Record) error {
	if v.before != nil {
		if err := v.before(ctx, e); err != nil {
			return err
		}
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	v.entries[e.LeaseID], v.states[e.LeaseID] = e, "issuing"
	return nil
}

func (v *inventory) Issued(_ context.Context, e credential.Record) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.issued++
	if _, ok := v.entries[e.LeaseID]; !ok {
		return fmt.Errorf("inventory: lease %s: %w", e.LeaseID, credential.ErrRecordGone)
	}
	v.entries[e.LeaseID], v.states[e.LeaseID] = e, "issued"
	return nil
}

func (v *inventory) Dropped(_ context.Context, id string) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	delete(v.entries, id)
	delete(v.states, id)
	return nil
}

func (v *inventory) Tracked(context.Context) (map[string]bool, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	out := map[string]bool{}
	for id := range v.entries {
		out[id] = true
	}
	return out, nil
}

func (v *inventory) get(id string) (credential.Record, string) {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.entries[id], v.states[id]
}

// eventually waits until cond holds of the record of id (the status is
// written after the answer).
func (v *inventory) eventually(t *testing.T, id, what string, cond func(e credential.Record, state string) bool) {
	t.Helper()
	harness.Eventually(t, 10*time.Second, what, func() (bool, error) {
		return cond(v.get(id)), nil
	})
}

func TestMintExtendDropThroughTheIssuer(t *testing.T) {
	ctx := context.Background()
	inv := newInventory()
	iss, clk := newIssuer(t, Options{Inventory: inv, Config: config(map[string]*pgengine.Role{"app": {
		DefaultTTL: pgengine.Duration{Duration: time.Minute}, MaxTTL: pgengine.Duration{Duration: 3 * time.Minute},
		CreationStatements: []string{create}, Allowed: []pgengine.Subject{{Namespace: "team", ServiceAccount: "app"}},
	}})})
	node := postgres.NewNode(iss.Local())
	l, err := issue(ctx, node, "team-a-mint0001", appPod("a"))
	if err != nil {
		t.Fatal(err)
	}
	if _, state := inv.get(l.ID); state == "" {
		t.Fatal("the mint answered before its record was written")
	}
	name := l.Values["username"]
	if name != postgres.RoleName(l.ID) || l.Info["port"] != fmt.Sprint(pg.Port) || l.Role != "main/app" {
		t.Fatalf("lease: name %q, info %v, role %q", name, l.Info, l.Role)
	}
	conn, err := login(ctx, l)
	if err != nil {
		t.Fatalf("login: %v", err)
	}
	conn.Close(ctx)
	inv.eventually(t, l.ID, "the record issued", func(e credential.Record, state string) bool {
		return state == "issued" && e.Name == name && e.Role == "main/app" && e.ExpiresAt.Equal(l.ExpiresAt) && e.Pod == appPod("a")
	})

	// The renewal is the issuer's Extend: VALID UNTIL moves, the record too.
	clk.advance(30 * time.Second)
	r, err := node.Renew(ctx, l)
	if err != nil {
		t.Fatal(err)
	}
	if !r.ExpiresAt.After(l.ExpiresAt) {
		t.Fatalf("renewal did not move the expiry: %s", r.ExpiresAt)
	}
	if v, _ := pg.ValidUntil(ctx, name); !v.Equal(r.ExpiresAt) {
		t.Fatalf("VALID UNTIL %s, want %s", v, r.ExpiresAt)
	}
	inv.eventually(t, l.ID, "the record extended", func(e credential.Record, _ string) bool {
		return e.ExpiresAt.Equal(r.ExpiresAt) && e.Class == "team/db"
	})
	// Another pod cannot extend it by naming its lease.
	other := postgres.ExtendRequest{LeaseID: l.ID, Params: appParams, Name: name, Pod: appPod("b")}
	if _, err := iss.Extend(ctx, Caller{}, other); !errors.Is(err, provider.ErrPermissionDenied) {
		t.Fatalf("extension by another pod: %v", err)
	}

	if err := node.Revoke(ctx, r); err != nil {
		t.Fatal(err)
	}
	if exists(t, name) {
		t.Fatal("role survives the drop")
	}
	if _, state := inv.get(l.ID); state != "" {
		t.Fatalf("record survives the drop: %s", state)
	}
	if err := node.Revoke(ctx, r); err != nil {
		t.Fatalf("second drop: %v", err)
	}

	// A kill switch knows the record only: Params from the record's Role.
	l2, err := issue(ctx, node, "team-a-mint0002", appPod("a"))
	if err != nil {
		t.Fatal(err)
	}
	e, _ := inv.get(l2.ID)
	conn2, rname, _ := strings.Cut(e.Role, "/")
	if err := iss.Drop(ctx, Caller{}, postgres.DropRequest{LeaseID: e.LeaseID, Name: e.Name,
		Params: map[string]string{postgres.ConnectionParam: conn2, postgres.RoleParam: rname}}); err != nil {
		t.Fatal(err)
	}
	// An issue interrupted before its answer was recorded: lease ID and
	// Params only.
	l3, err := issue(ctx, node, "team-a-mint0003", appPod("a"))
	if err != nil {
		t.Fatal(err)
	}
	if err := node.Revoke(ctx, provider.Lease{ID: l3.ID, Params: appParams}); err != nil {
		t.Fatal(err)
	}
	for _, l := range []provider.Lease{l2, l3} {
		if exists(t, l.Values["username"]) {
			t.Errorf("role %s survives", l.Values["username"])
		}
	}
}

// Refusals create nothing: no role, no record.
func TestRefusalsCreateNothing(t *testing.T) {
	ctx := context.Background()
	inv := newInventory()
	var checked []string
	podCheck := func(_ context.Context, c Caller, pod provider.Pod, class, _ string) error {
		checked = append(checked, c.Node+" "+pod.Name+" "+class)
		if pod.Name == "elsewhere" {
			return fmt.Errorf("%w: pod is not on node %s", provider.ErrPermissionDenied, c.Node)
		}
		return nil
	}
	iss, _ := newIssuer(t, Options{Inventory: inv, PodCheck: podCheck, Config: config(map[string]*pgengine.Role{"app": {
		CreationStatements: []string{create}, MaxLive: 2,
		Allowed: []pgengine.Subject{{Namespace: "team", ServiceAccount: "app"}},
	}})})
	node := postgres.NewNode(as{iss, Caller{Node: "n1"}})

	outsider := provider.Pod{Namespace: "team", Name: "x", UID: "u", ServiceAccount: "intruder"}
	for id, pod := range map[string]provider.Pod{"team-x-refused1": outsider, "team-x-refused2": appPod("elsewhere")} {
		if _, err := issue(ctx, node, id, pod); !errors.Is(err, provider.ErrPermissionDenied) {
			t.Errorf("%s: %v, want ErrPermissionDenied", id, err)
		}
		if exists(t, postgres.RoleName(id)) {
			t.Errorf("%s: a role was made", id)
		}
		if _, state := inv.get(id); state != "" {
			t.Errorf("%s: a record was left (%s)", id, state)
		}
	}
	if len(checked) != 1 || checked[0] != "n1 elsewhere team/db" {
		t.Fatalf("PodCheck asked %q, want only the allowed pod, with the caller's node and the class", checked)
	}

	// maxLive 2 per service account: the third is refused, nothing made.
	var leases []provider.Lease
	for i := range 2 {
		l, err := issue(ctx, node, fmt.Sprintf("team-q-quota%d", i), appPod(fmt.Sprint("q", i)))
		if err != nil {
			t.Fatal(err)
		}
		leases = append(leases, l)
	}
	if _, err := issue(ctx, node, "team-q-quota2", appPod("q2")); !errors.Is(err, provider.ErrPermissionDenied) {
		t.Fatalf("third: %v, want ErrPermissionDenied", err)
	}
	if exists(t, postgres.RoleName("team-q-quota2")) {
		t.Fatal("the refused mint made a role")
	}
	if _, state := inv.get("team-q-quota2"); state != "" {
		t.Fatalf("the refused mint left a record (%s)", state)
	}
	// A drop makes room.
	if err := node.Revoke(ctx, leases[0]); err != nil {
		t.Fatal(err)
	}
	l, err := issue(ctx, node, "team-q-quota3", appPod("q3"))
	if err != nil {
		t.Fatalf("after a drop: %v", err)
	}
	for _, l := range append(leases[1:], l) {
		_ = node.Revoke(ctx, l)
	}

	// Extend asks PodCheck too: the pod is gone (here: the check says so).
	podGone := false
	iss2, _ := newIssuer(t, Options{PodCheck: func(context.Context, Caller, provider.Pod, string, string) error {
		if podGone {
			return fmt.Errorf("%w: pod gone", provider.ErrPermissionDenied)
		}
		return nil
	}})
	node2 := postgres.NewNode(iss2.Local())
	l, err = issue(ctx, node2, "team-g-gone0001", appPod("g"))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = node2.Revoke(ctx, l) }()
	before, _ := pg.ValidUntil(ctx, l.Values["username"])
	podGone = true
	if _, err := node2.Renew(ctx, l); !errors.Is(err, provider.ErrPermissionDenied) {
		t.Fatalf("renewal of a gone pod: %v", err)
	}
	if after, _ := pg.ValidUntil(ctx, l.Values["username"]); !after.Equal(before) {
		t.Fatalf("VALID UNTIL moved from %s to %s", before, after)
	}
}

// maxLive holds across replicas: concurrent mints through two issuers of
// the same configuration make exactly maxLive roles.
func TestMaxLiveHoldsAcrossReplicas(t *testing.T) {
	ctx := context.Background()
	cfg := func() pgengine.Config {
		return config(map[string]*pgengine.Role{"app": {CreationStatements: []string{create}, MaxLive: 3,
			Allowed: []pgengine.Subject{{Namespace: "team", ServiceAccount: "app"}}}})
	}
	a, _ := newIssuer(t, Options{Config: cfg()})
	b, _ := newIssuer(t, Options{Config: cfg()})
	nodes := []*postgres.Provider{postgres.NewNode(a.Local()), postgres.NewNode(b.Local())}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var made []provider.Lease
	refused := 0
	for i := range 10 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			l, err := issue(ctx, nodes[i%2], fmt.Sprintf("team-r-race%02d", i), appPod(fmt.Sprint("r", i)))
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil:
				made = append(made, l)
			case errors.Is(err, provider.ErrPermissionDenied):
				refused++
			default:
				t.Errorf("mint %d: %v", i, err)
			}
		}()
	}
	wg.Wait()
	n, _ := pg.CountRoles(ctx, "esc_team_r_race")
	if len(made) != 3 || refused != 7 || n != 3 {
		t.Errorf("%d made, %d refused, %d roles; want 3, 7, 3", len(made), refused, n)
	}
	for _, l := range made {
		_ = nodes[0].Revoke(ctx, l)
	}
}

// A node plugin reaches only the roles it asked for: another node can
// neither extend nor drop them, even knowing the lease ID; the kill
// switch (no node) can.
func TestANodeReachesOnlyItsOwnRoles(t *testing.T) {
	ctx := context.Background()
	iss, clk := newIssuer(t, Options{})
	n1 := postgres.NewNode(as{iss, Caller{Node: "n1"}})
	n2 := postgres.NewNode(as{iss, Caller{Node: "n2"}})
	l, err := issue(ctx, n1, "team-n-node0001", appPod("n"))
	if err != nil {
		t.Fatal(err)
	}
	name := l.Values["username"]
	var comment string
	conn, err := pgx.Connect(ctx, pg.AdminURL())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	if err := conn.QueryRow(ctx, `SELECT shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = $1`, name).Scan(&comment); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(comment, " node=n1 ") || !strings.Contains(comment, "lease=team-n-node0001 ") {
		t.Fatalf("tag %q", comment)
	}
	clk.advance(30 * time.Minute)
	if _, err := n2.Renew(ctx, l); !errors.Is(err, provider.ErrPermissionDenied) {
		t.Errorf("extension by another node: %v", err)
	}
	if err := n2.Revoke(ctx, l); !errors.Is(err, provider.ErrPermissionDenied) {
		t.Errorf("drop by another node: %v", err)
	}
	if !exists(t, name) {
		t.Fatal("another node dropped the role")
	}
	if _, err := n1.Renew(ctx, l); err != nil {
		t.Errorf("extension by its node: %v", err)
	}
	if err := iss.Drop(ctx, Caller{}, postgres.DropRequest{LeaseID: l.ID, Params: appParams}); err != nil || exists(t, name) {
		t.Fatalf("kill switch: %v", err)
	}
	// Its node's drop of a role gone already succeeds.
	if err := n1.Revoke(ctx, l); err != nil {
		t.Fatal(err)
	}
}

// withdrawing is an inventory in memory that also knows which pod
// volumes were withdrawn (Withdrawals), or fails to tell.
type withdrawing struct {
	*inventory
	withdrawn map[string]bool // pod UID + "/" + volume ID
	err       error
}

func (w withdrawing) Withdrawn(_ context.Context, e credential.Record) (bool, error) {
	return w.withdrawn[e.Pod.UID+"/"+e.VolumeID], w.err
}

// TestMintRefusesAWithdrawnVolume: a volume whose credential was withdrawn
// (the kill switch) is refused a new one, with the reason, and nothing is
// left (no role, no record); the pod's other volume is not; an inventory
// that cannot tell refuses for now (Unavailable); one without
// Withdrawals refuses nothing.
func TestMintRefusesAWithdrawnVolume(t *testing.T) {
	ctx := context.Background()
	inv := withdrawing{inventory: newInventory(), withdrawn: map[string]bool{"uid-k/vol-killed": true}}
	iss, _ := newIssuer(t, Options{Inventory: inv})
	node := postgres.NewNode(as{iss, Caller{Node: "n1"}})
	mint := func(p *postgres.Provider, id, volumeID string) error {
		l, err := p.Issue(ctx, provider.Request{LeaseID: id, VolumeID: volumeID, Class: "team/db", Params: appParams, Pod: appPod("k")})
		if err == nil {
			l.ID, l.Params, l.Provider = id, appParams, postgres.Name
			if err := p.Revoke(ctx, l); err != nil {
				t.Fatal(err)
			}
		}
		return err
	}
	err := mint(node, "team-k-killed01", "vol-killed")
	if !errors.Is(err, provider.ErrPermissionDenied) || !errors.Is(err, ErrWithdrawn) ||
		!strings.Contains(err.Error(), "withdrawn by deleting its Credential record") {
		t.Errorf("a withdrawn volume: %v, want permission denied, withdrawn", err)
	}
	if exists(t, postgres.RoleName("team-k-killed01")) {
		t.Error("the refused mint made a role")
	}
	if _, state := inv.get("team-k-killed01"); state != "" {
		t.Errorf("the refused mint left a record (%s)", state)
	}
	if err := mint(node, "team-k-other001", "vol-other"); err != nil {
		t.Errorf("the pod's other volume: %v", err)
	}

	failing := withdrawing{inventory: newInventory(), err: errors.New("API server unreachable")}
	iss2, _ := newIssuer(t, Options{Inventory: failing})
	if err := mint(postgres.NewNode(as{iss2, Caller{Node: "n1"}}), "team-k-unknown1", "vol-killed"); !errors.Is(err, provider.ErrUnavailable) {
		t.Errorf("an inventory that cannot tell: %v, want unavailable", err)
	}
	if exists(t, postgres.RoleName("team-k-unknown1")) {
		t.Error("a mint whose volume could not be checked made a role")
	}

	plain, _ := newIssuer(t, Options{Inventory: newInventory()})
	if err := mint(postgres.NewNode(as{plain, Caller{Node: "n1"}}), "team-k-plain001", "vol-killed"); err != nil {
		t.Errorf("an inventory without Withdrawals: %v", err)
	}
}

// killedAsIssued is an inventory in memory whose records are deleted as
// they are minted (the kill switch between Issuing and Issued).
type killedAsIssued struct{ *inventory }

func (k killedAsIssued) Issued(_ context.Context, e credential.Record) error {
	return fmt.Errorf("inventory: lease %s: %w", e.LeaseID, credential.ErrRecordGone)
}

// TestMintOfARecordKilledMeanwhileIsDropped: a record deleted while its
// role was being made (its revocation may have run before the role
// existed) leaves no role: the writer of its status, after the answer,
// finds the record gone and drops the role.
func TestMintOfARecordKilledMeanwhileIsDropped(t *testing.T) {
	ctx := context.Background()
	iss, _ := newIssuer(t, Options{Inventory: killedAsIssued{newInventory()}})
	l, err := issue(ctx, postgres.NewNode(as{iss, Caller{Node: "n1"}}), "team-k-racing01", appPod("k"))
	if err != nil {
		t.Fatalf("Mint: %v (the record's status is written after the answer)", err)
	}
	harness.Eventually(t, 10*time.Second, "the role of a record killed as it was minted dropped", func() (bool, error) {
		ok, err := pg.RoleExists(ctx, l.Values["username"])
		return !ok, err
	})
}

// roleExistsBefore is an Inventory.Issuing hook that writes a record only
// once its role exists (at most 5 s), then fails with err (nil: writes).
func roleExistsBefore(err error) func(ctx context.Context, e credential.Record) error {
	return func(ctx context.Context, e credential.Record) error {
		deadline := time.Now().Add(5 * time.Second)
		for {
			made, rerr := pg.RoleExists(ctx, e.Name)
			switch {
			case rerr != nil:
				return rerr
			case made:
				return err
			case time.Now().After(deadline):
				return errors.New("the role was not made while its record was being written")
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
}

// TestTheRecordAndTheRoleAreMadeAtOnce: a mint writes its record while
// its role is made (its answer waits for the longer of the two, not
// their sum); here each record's write waits until its role exists. A
// record that fails after its role was made has the role dropped before
// the answer (Unavailable), and no record is left; so does one that fails
// at once, whether its role was made yet or not.
func TestTheRecordAndTheRoleAreMadeAtOnce(t *testing.T) {
	ctx := context.Background()
	failure := errors.New("API server unreachable")
	for _, tc := range []struct {
		name   string
		before func(ctx context.Context, e credential.Record) error
		ok     bool
	}{
		{"recorded while the role is made", roleExistsBefore(nil), true},
		{"the record fails after the role was made", roleExistsBefore(failure), false},
		{"the record fails at once", func(context.Context, credential.Record) error { return failure }, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			inv := newInventory()
			inv.before = tc.before
			iss, _ := newIssuer(t, Options{Inventory: inv})
			node := postgres.NewNode(as{iss, Caller{Node: "n1"}})
			id := "team-c-" + strings.ReplaceAll(tc.name[:12], " ", "")
			l, err := issue(ctx, node, id, appPod("c"))
			if !tc.ok {
				if !errors.Is(err, provider.ErrUnavailable) || !strings.Contains(err.Error(), "recording the credential") {
					t.Fatalf("Mint: %v, want unavailable, recording", err)
				}
				if exists(t, postgres.RoleName(id)) {
					t.Error("the role of a record that failed lives")
				}
				if _, state := inv.get(id); state != "" {
					t.Errorf("a record is left (%s)", state)
				}
				return
			}
			if err != nil {
				t.Fatalf("Mint: %v", err)
			}
			defer func() { _ = node.Revoke(ctx, l) }()
			if _, state := inv.get(id); state == "" || !exists(t, l.Values["username"]) {
				t.Fatalf("record %q, role made %v: want both", state, exists(t, l.Values["username"]))
			}
		})
	}
}

// TestAStatusWriteWaitsForTheMintUnderWay: a mint's status is not
// written while another mint is under way (one is enough: a status write
// costs the API server about twice a record's creation, and nobody waits
// for it), and is written once that mint has answered.
func TestAStatusWriteWaitsForTheMintUnderWay(t *testing.T) {
	ctx := context.Background()
	inv := newInventory()
	slowID, quickID := "team-w-slow0001", "team-w-quick001"
	entered, release := make(chan struct{}), make(chan struct{})
	inv.before = func(ctx context.Context, e credential.Record) error {
		if e.LeaseID == slowID {
			close(entered)
			<-release
		}
		return nil
	}
	iss, _ := newIssuer(t, Options{Inventory: inv})
	node := postgres.NewNode(as{iss, Caller{Node: "n1"}})
	type result struct {
		l   provider.Lease
		err error
	}
	slow := make(chan result, 1)
	go func() {
		l, err := issue(ctx, node, slowID, appPod("w1"))
		slow <- result{l, err}
	}()
	<-entered
	l, err := issue(ctx, node, quickID, appPod("w2"))
	if err != nil {
		close(release)
		t.Fatalf("Mint: %v", err)
	}
	defer func() { _ = node.Revoke(ctx, l) }()
	time.Sleep(300 * time.Millisecond) // well past mintQuiet, well within recordDefer
	_, state := inv.get(quickID)
	close(release)
	if state != "issuing" {
		t.Errorf("the status of a mint was written (%q) while another mint was under way", state)
	}
	r := <-slow
	if r.err != nil {
		t.Fatalf("the other mint: %v", r.err)
	}
	defer func() { _ = node.Revoke(ctx, r.l) }()
	for _, id := range []string{quickID, slowID} {
		inv.eventually(t, id, "the status written once no mint is under way", func(_ credential.Record, state string) bool { return state == "issued" })
	}
}
