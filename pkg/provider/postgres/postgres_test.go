package postgres

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/test/pgtest"
)

var pg *pgtest.Server

func TestMain(m *testing.M) {
	var err error
	if pg, err = pgtest.Start(); err != nil {
		fmt.Println(err)
		os.Exit(1)
	}
	code := m.Run()
	pg.Close()
	os.Exit(code)
}

const create = `CREATE ROLE "{{.Name}}" LOGIN PASSWORD '{{.Password}}' VALID UNTIL '{{.Expiration}}'`

// clock is a settable time: the zero offset is the real time.
type clock struct{ offset time.Duration }

func (c *clock) now() time.Time { return time.Now().Add(c.offset) }

// newProvider is the node side over an Admin of roles on the test server.
func newProvider(t *testing.T, roles map[string]*Role) (*Provider, *clock) {
	t.Helper()
	c := &clock{}
	a, err := NewAdmin(Config{Connections: map[string]*Connection{"main": {URL: pg.AdminURL(), Roles: roles}}}, c.now)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(a.Close)
	return NewNode(a), c
}

var everyone = []Subject{{Namespace: "*", ServiceAccount: "*"}}

func request(id string, params map[string]string) provider.Request {
	return provider.Request{LeaseID: id, Params: params, Pod: provider.Pod{Namespace: "ns", Name: "pod", ServiceAccount: "sa"}}
}

func TestIssueRenewRevoke(t *testing.T) {
	ctx := context.Background()
	p, clk := newProvider(t, map[string]*Role{"r": {
		DefaultTTL: Duration{time.Minute}, MaxTTL: Duration{90 * time.Second},
		CreationStatements: []string{create}, Allowed: everyone,
	}})
	params := map[string]string{ConnectionParam: "main", RoleParam: "r"}
	l, err := p.Issue(ctx, request("ns-pod-issue001", params))
	if err != nil {
		t.Fatal(err)
	}
	l.ID, l.Params = "ns-pod-issue001", params
	name := l.Values["username"]
	if name != RoleName(l.ID) || len(l.Values["password"]) != 32 {
		t.Fatalf("values: %q, password of %d chars", name, len(l.Values["password"]))
	}
	conn, err := pgx.Connect(ctx, pg.URL(name, l.Values["password"]))
	if err != nil {
		t.Fatalf("login: %v", err)
	}
	conn.Close(ctx)

	// Renewal moves VALID UNTIL, capped at maxTTL after issue.
	at := func(d time.Duration) { clk.offset = time.Until(l.IssuedAt.Add(d)) }
	at(20 * time.Second)
	r, err := p.Renew(ctx, l)
	if err != nil {
		t.Fatal(err)
	}
	if want := l.IssuedAt.Add(80 * time.Second); !r.ExpiresAt.Equal(want) {
		t.Fatalf("renewed to %s, want %s", r.ExpiresAt, want)
	}
	if v, _ := pg.ValidUntil(ctx, name); !v.Equal(r.ExpiresAt) {
		t.Fatalf("VALID UNTIL %s, want %s", v, r.ExpiresAt)
	}
	at(60 * time.Second)
	if r, err = p.Renew(ctx, r); err != nil || !r.ExpiresAt.Equal(l.IssuedAt.Add(90*time.Second)) {
		t.Fatalf("renewal up to maxTTL: %v, expires %s", err, r.ExpiresAt)
	}
	at(85 * time.Second)
	if _, err := p.Renew(ctx, r); !errors.Is(err, provider.ErrNotRenewable) {
		t.Fatalf("renewal past maxTTL: %v, want ErrNotRenewable", err)
	}

	if err := p.Revoke(ctx, r); err != nil {
		t.Fatal(err)
	}
	if ok, _ := pg.RoleExists(ctx, name); ok {
		t.Fatal("role survives revocation")
	}
	if err := p.Revoke(ctx, r); err != nil {
		t.Fatalf("second revoke: %v", err)
	}
	// An issue interrupted before its handle was recorded: revoke by ID alone.
	l2, err := p.Issue(ctx, request("ns-pod-issue002", params))
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Revoke(ctx, provider.Lease{ID: "ns-pod-issue002", Params: params}); err != nil {
		t.Fatal(err)
	}
	if ok, _ := pg.RoleExists(ctx, l2.Values["username"]); ok {
		t.Fatal("revoke by ID left the role")
	}
}

func TestIssueRefusals(t *testing.T) {
	ctx := context.Background()
	p, _ := newProvider(t, map[string]*Role{
		"r": {CreationStatements: []string{create}, Allowed: []Subject{{Namespace: "ns", ServiceAccount: "other"}}},
	})
	for name, tc := range map[string]struct {
		params map[string]string
		want   error
	}{
		"not allowed":        {map[string]string{ConnectionParam: "main", RoleParam: "r"}, provider.ErrPermissionDenied},
		"unknown connection": {map[string]string{ConnectionParam: "x", RoleParam: "r"}, provider.ErrInvalidParameters},
		"unknown role":       {map[string]string{ConnectionParam: "main", RoleParam: "x"}, provider.ErrInvalidParameters},
		"unknown parameter":  {map[string]string{ConnectionParam: "main", RoleParam: "r", "grant": "ALL"}, provider.ErrInvalidParameters},
		"missing role":       {map[string]string{ConnectionParam: "main"}, provider.ErrInvalidParameters},
	} {
		if _, err := p.Issue(ctx, request("ns-pod-refused", tc.params)); !errors.Is(err, tc.want) {
			t.Errorf("%s: %v, want %v", name, err, tc.want)
		}
	}
	p2, _ := newProvider(t, map[string]*Role{"r": {CreationStatements: []string{create}, Allowed: everyone, MaxTTL: Duration{time.Hour}}})
	for _, ttl := range []string{"2h", "1s", "soon"} {
		_, err := p2.Issue(ctx, request("ns-pod-ttl", map[string]string{ConnectionParam: "main", RoleParam: "r", TTLParam: ttl}))
		if !errors.Is(err, provider.ErrInvalidParameters) {
			t.Errorf("ttl %s: %v", ttl, err)
		}
	}
	n1, _ := pg.CountRoles(ctx, "esc_ns_pod_refused")
	n2, _ := pg.CountRoles(ctx, "esc_ns_pod_ttl")
	if n := n1 + n2; n != 0 {
		t.Errorf("%d roles created by refused issues", n)
	}
}

// A failing creation statement that quotes the verifier must not carry it
// into the error, and the transaction leaves no role.
func TestFailedIssueNeverQuotesTheVerifier(t *testing.T) {
	ctx := context.Background()
	p, _ := newProvider(t, map[string]*Role{"r": {
		CreationStatements: []string{create, `SELECT '{{.Password}}'::int`}, Allowed: everyone,
	}})
	_, err := p.Issue(ctx, request("ns-pod-quoted", map[string]string{ConnectionParam: "main", RoleParam: "r"}))
	if err == nil {
		t.Fatal("issue succeeded")
	}
	if !strings.Contains(err.Error(), "[redacted]") {
		t.Fatalf("error does not show the redaction (so the test proves nothing): %v", err)
	}
	if errors.Is(err, provider.ErrUnavailable) {
		t.Errorf("a statement error is not an outage: %v", err)
	}
	if ok, _ := pg.RoleExists(ctx, RoleName("ns-pod-quoted")); ok {
		t.Error("the failed transaction left a role")
	}
}

func TestUnreachableServerIsUnavailable(t *testing.T) {
	p, err := New(Config{Connections: map[string]*Connection{"main": {
		URL:   "postgres://u:p@127.0.0.1:1/db?connect_timeout=2",
		Roles: map[string]*Role{"r": {CreationStatements: []string{create}, Allowed: everyone}},
	}}})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	_, err = p.Issue(context.Background(), request("ns-pod-down", map[string]string{ConnectionParam: "main", RoleParam: "r"}))
	if !errors.Is(err, provider.ErrUnavailable) {
		t.Fatalf("%v, want ErrUnavailable", err)
	}
	if strings.Contains(err.Error(), "u:p@") {
		t.Fatalf("error quotes the admin URL: %v", err)
	}
}

func TestConfigValidation(t *testing.T) {
	for name, cfg := range map[string]Config{
		"no connections": {},
		"bad url":        {Connections: map[string]*Connection{"c": {URL: "postgres://u:SECRET@[::1", Roles: map[string]*Role{"r": {CreationStatements: []string{create}, Allowed: everyone}}}}},
		"no roles":       {Connections: map[string]*Connection{"c": {URL: "postgres://localhost/db"}}},
		"no statements":  {Connections: map[string]*Connection{"c": {URL: "postgres://localhost/db", Roles: map[string]*Role{"r": {Allowed: everyone}}}}},
		"no name":        {Connections: map[string]*Connection{"c": {URL: "postgres://localhost/db", Roles: map[string]*Role{"r": {CreationStatements: []string{"CREATE ROLE x"}, Allowed: everyone}}}}},
		"nobody allowed": {Connections: map[string]*Connection{"c": {URL: "postgres://localhost/db", Roles: map[string]*Role{"r": {CreationStatements: []string{create}}}}}},
		"plain password": {Connections: map[string]*Connection{"c": {URL: "postgres://localhost/db", Roles: map[string]*Role{"r": {CreationStatements: []string{create + ` -- '{{.PlainPassword}}'`}, Allowed: everyone}}}}},
		"odd name":       {Connections: map[string]*Connection{"c d": {URL: "postgres://localhost/db", Roles: map[string]*Role{"r": {CreationStatements: []string{create}, Allowed: everyone}}}}},
		"negative quota": {Connections: map[string]*Connection{"c": {URL: "postgres://localhost/db", Roles: map[string]*Role{"r": {CreationStatements: []string{create}, Allowed: everyone, MaxLive: -1}}}}},
		"ttl order":      {Connections: map[string]*Connection{"c": {URL: "postgres://localhost/db", Roles: map[string]*Role{"r": {CreationStatements: []string{create}, Allowed: everyone, DefaultTTL: Duration{2 * time.Hour}, MaxTTL: Duration{time.Hour}}}}}},
	} {
		_, err := New(cfg)
		if err == nil {
			t.Errorf("%s: accepted", name)
		} else if strings.Contains(err.Error(), "SECRET") {
			t.Errorf("%s: error quotes the URL's password: %v", name, err)
		}
	}
}

func TestRoleName(t *testing.T) {
	if got := RoleName("ns-pod-abcdefgh"); got != "esc_ns_pod_abcdefgh" {
		t.Errorf("RoleName = %q", got)
	}
	long := strings.Repeat("n", 16) + "-" + strings.Repeat("p", 30) + "-abcdefgh"
	got := RoleName(long)
	if len(got) > 63 || !strings.HasPrefix(got, "esc_nnn") || !strings.HasSuffix(got, "_abcdefgh") || RoleName(long) != got {
		t.Errorf("RoleName(long) = %q (%d bytes)", got, len(got))
	}
}

// Every SQLSTATE class and override is mapped on purpose: this list is
// written apart from the table it checks, and must name the same rows.
func TestEverySQLStateClassIsMapped(t *testing.T) {
	want := map[string]disposition{
		"01": misconfigured, "02": misconfigured, "03": misconfigured, "08": transient, "09": misconfigured,
		"0A": misconfigured, "0B": misconfigured, "0F": misconfigured, "0L": misconfigured, "0P": misconfigured,
		"0Z": misconfigured, "20": misconfigured, "21": misconfigured, "22": misconfigured, "23": misconfigured,
		"24": misconfigured, "25": misconfigured, "26": misconfigured, "27": misconfigured, "28": misconfigured,
		"2B": unavailable, "2D": misconfigured, "2F": misconfigured, "34": misconfigured, "38": misconfigured,
		"39": misconfigured, "3B": misconfigured, "3D": misconfigured, "3F": misconfigured, "40": transient,
		"42": misconfigured, "44": misconfigured, "53": transient, "54": misconfigured, "55": misconfigured,
		"57": transient, "58": unavailable, "72": transient, "F0": misconfigured, "HV": misconfigured,
		"P0": misconfigured, "XX": unavailable,
		// Codes that differ from their class.
		"40001": transient, "40P01": transient, "40003": unavailable, "42710": unavailable, "55006": transient,
		"55P03": transient, "57014": transient, "57P01": transient, "57P03": transient, "57P04": misconfigured,
		"XX000": transient, "XX001": unavailable, "53300": transient, "08006": transient, "28P01": misconfigured,
		"42P01": misconfigured, "22P02": misconfigured,
		// A class this table does not know is never final.
		"ZZ": unavailable,
	}
	sentinel := map[disposition]error{
		transient: provider.ErrUnavailable, unavailable: provider.ErrUnavailable, misconfigured: provider.ErrMisconfigured,
	}
	for code, d := range want {
		full := code
		if len(full) == 2 {
			full += "999" // a code of the class that no override names
		}
		t.Run(full, func(t *testing.T) {
			err := &pgconn.PgError{Code: full, Message: "m"}
			if got := dispositionOf(err); got != d {
				t.Fatalf("disposition %d, want %d", got, d)
			}
			if got := classify(err, "x"); !errors.Is(got, sentinel[d]) {
				t.Fatalf("classified as %v, want %v", got, sentinel[d])
			}
			if retryable(err, false) != (d == transient) {
				t.Fatalf("retryable = %v", !(d == transient))
			}
			if retryable(err, true) {
				t.Fatal("retried although the outcome is unknown")
			}
		})
	}
	for class := range sqlstateClasses {
		if _, ok := want[class]; !ok {
			t.Errorf("class %s has no row in this test", class)
		}
	}
	for code := range sqlstateCodes {
		if _, ok := want[code]; !ok {
			t.Errorf("code %s has no row in this test", code)
		}
	}
	// No SQLSTATE at all: the server could not be reached or went away.
	if d := dispositionOf(errors.New("unexpected EOF")); d != transient {
		t.Errorf("connection loss: %d, want transient", d)
	}
	if d := dispositionOf(&pgconn.ConnectError{}); d != unavailable {
		t.Errorf("server unreachable: %d, want unavailable", d)
	}
	if d := dispositionOf(context.DeadlineExceeded); d != unavailable {
		t.Errorf("deadline: %d, want unavailable", d)
	}
}

// A creation statement that names a missing table is the admin's to fix:
// ErrMisconfigured, not retried, nothing left behind.
func TestMissingTableIsMisconfigured(t *testing.T) {
	ctx := context.Background()
	p, _ := newProvider(t, map[string]*Role{"r": {
		CreationStatements: []string{create, `GRANT SELECT ON public.no_such_table TO "{{.Name}}"`}, Allowed: everyone,
	}})
	_, err := p.Issue(ctx, request("ns-pod-notable", map[string]string{ConnectionParam: "main", RoleParam: "r"}))
	if !errors.Is(err, provider.ErrMisconfigured) || errors.Is(err, provider.ErrUnavailable) {
		t.Fatalf("%v, want ErrMisconfigured", err)
	}
	if ok, _ := pg.RoleExists(ctx, RoleName("ns-pod-notable")); ok {
		t.Error("the failed transaction left a role")
	}
}

// Connections the server ends (an admin's pg_terminate_backend, a
// restart: 57P01 or a lost connection) are retried within the call.
func TestTerminatedConnectionsAreRetried(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	p, _ := newProvider(t, map[string]*Role{"r": {CreationStatements: []string{create}, Allowed: everyone}})
	params := map[string]string{ConnectionParam: "main", RoleParam: "r"}
	l, err := p.Issue(ctx, request("ns-pod-term1", params))
	if err != nil {
		t.Fatal(err)
	}
	l.ID, l.Params = "ns-pod-term1", params
	for i, call := range []func() error{
		func() error { _, err := p.Issue(ctx, request("ns-pod-term2", params)); return err },
		func() error { return p.Revoke(ctx, l) },
	} {
		// Every admin connection the pool holds is ended under it.
		if err := pg.Exec(ctx, `SELECT pg_terminate_backend(pid) FROM pg_stat_activity
			WHERE usename = 'postgres' AND pid <> pg_backend_pid() AND backend_type = 'client backend'`); err != nil {
			t.Fatal(err)
		}
		if err := call(); err != nil {
			t.Fatalf("call %d after its connections were ended: %v", i, err)
		}
	}
	for _, id := range []string{"ns-pod-term1", "ns-pod-term2"} {
		if id == "ns-pod-term2" {
			_ = p.Revoke(ctx, provider.Lease{ID: id, Params: params})
		}
		if ok, _ := pg.RoleExists(ctx, RoleName(id)); ok {
			t.Errorf("role of %s survives", id)
		}
	}
}

// Configurations written for the node-side provider that quoted the
// plaintext password are refused at load, saying why.
func TestPlainPasswordIsRefusedAtLoad(t *testing.T) {
	_, err := New(Config{Connections: map[string]*Connection{"c": {URL: "postgres://localhost/db", Roles: map[string]*Role{"r": {
		CreationStatements: []string{`CREATE ROLE "{{.Name}}" LOGIN PASSWORD '{{.PlainPassword}}'`}, Allowed: everyone}}}}})
	if err == nil || !strings.Contains(err.Error(), "{{.PlainPassword}}") || !strings.Contains(err.Error(), "{{.Password}}") {
		t.Fatalf("%v, want a refusal that names PlainPassword and its replacement", err)
	}
}

// A role the driver did not make (no tag, or another lease's tag) is
// never extended or dropped, even under the name a lease ID gives.
func TestUntaggedRolesAreLeftAlone(t *testing.T) {
	ctx := context.Background()
	a := newAdmin(t)
	params := map[string]string{ConnectionParam: "main", RoleParam: "r"}
	name := RoleName("ns-pod-untagged")
	other := RoleName("ns-pod-othertag")
	if err := pg.Exec(ctx, `CREATE ROLE `+name+` LOGIN VALID UNTIL '2000-01-01'`,
		`CREATE ROLE `+other+` LOGIN VALID UNTIL '2000-01-01'`,
		`COMMENT ON ROLE `+other+` IS '`+tagPrefix+`lease=ns-pod-someone-else created=2000-01-01T00:00:00Z'`); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = pg.Exec(ctx, `DROP ROLE IF EXISTS `+name, `DROP ROLE IF EXISTS `+other) }()
	for _, id := range []string{"ns-pod-untagged", "ns-pod-othertag"} {
		if err := a.Drop(ctx, DropRequest{LeaseID: id, Params: params}); !errors.Is(err, provider.ErrPermissionDenied) {
			t.Errorf("drop %s: %v, want ErrPermissionDenied", id, err)
		}
		if _, err := a.Extend(ctx, ExtendRequest{LeaseID: id, Params: params}); !errors.Is(err, provider.ErrPermissionDenied) {
			t.Errorf("extend %s: %v, want ErrPermissionDenied", id, err)
		}
		if ok, _ := pg.RoleExists(ctx, RoleName(id)); !ok {
			t.Errorf("role of %s was dropped", id)
		}
	}
	roles, err := a.Tagged(ctx, "main")
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range roles {
		if r.Name == name || r.Name == other {
			t.Errorf("%s listed as the driver's", r.Name)
		}
	}
}

// The verifier and the pod identity come from a node: anything but their
// expected form is refused before a statement is made of them.
func TestMintRefusesMalformedInput(t *testing.T) {
	ctx := context.Background()
	a := newAdmin(t)
	good, _ := scramVerifier("x")
	params := map[string]string{ConnectionParam: "main", RoleParam: "r"}
	pod := provider.Pod{Namespace: "ns", Name: "pod", ServiceAccount: "sa"}
	for name, r := range map[string]MintRequest{
		"verifier":  {LeaseID: "ns-pod-bad1", Params: params, Pod: pod, Verifier: good + `'; DROP ROLE postgres; --`},
		"empty":     {LeaseID: "ns-pod-bad2", Params: params, Pod: pod},
		"lease ID":  {LeaseID: "ns pod'bad3", Params: params, Pod: pod, Verifier: good},
		"pod name":  {LeaseID: "ns-pod-bad4", Params: params, Pod: provider.Pod{Namespace: "ns", Name: "p' x", ServiceAccount: "sa"}, Verifier: good},
		"the class": {LeaseID: "ns-pod-bad5", Params: params, Pod: pod, Class: "ns/x y", Verifier: good},
	} {
		if _, err := a.Mint(ctx, r); !errors.Is(err, provider.ErrInvalidParameters) {
			t.Errorf("%s: %v, want ErrInvalidParameters", name, err)
		}
	}
	if n, _ := pg.CountRoles(ctx, "esc_ns_pod_bad"); n != 0 {
		t.Errorf("%d roles made of malformed requests", n)
	}
}

func newAdmin(t *testing.T) *Admin {
	t.Helper()
	a, err := NewAdmin(Config{Connections: map[string]*Connection{"main": {URL: pg.AdminURL(),
		Roles: map[string]*Role{"r": {CreationStatements: []string{create}, Allowed: everyone}}}}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(a.Close)
	return a
}
