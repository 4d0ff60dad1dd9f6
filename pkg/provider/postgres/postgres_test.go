package postgres_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/ephemeral-secrets/csi-driver/pkg/issuer"
	pgengine "github.com/ephemeral-secrets/csi-driver/pkg/issuer/postgres"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider/postgres"
	"github.com/ephemeral-secrets/csi-driver/test/pgtest"
)

var pg *pgtest.Server

func TestMain(m *testing.M) { pgtest.Main(m, &pg) }

const create = `CREATE ROLE "{{.Name}}" LOGIN PASSWORD '{{.Password}}' VALID UNTIL '{{.Expiration}}'`

// clock is a settable time: the zero offset is the real time.
type clock struct{ offset time.Duration }

func (c *clock) now() time.Time { return time.Now().Add(c.offset) }

// newProvider is the node side over an in-process issuer (no cluster) of
// roles on the test server.
func newProvider(t *testing.T, roles map[string]*pgengine.Role) (*postgres.Provider, *clock) {
	t.Helper()
	c := &clock{}
	iss := newIssuer(t, pgengine.Config{Connections: map[string]*pgengine.Connection{"main": {URL: pg.AdminURL(), Roles: roles}}}, c.now)
	return postgres.NewNode(iss.Local()), c
}

func newIssuer(t *testing.T, cfg pgengine.Config, now func() time.Time) *issuer.Issuer {
	t.Helper()
	iss, err := issuer.New(issuer.Options{Config: cfg, Now: now})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(iss.Close)
	return iss
}

var everyone = []pgengine.Subject{{Namespace: "*", ServiceAccount: "*"}}

func request(id string, params map[string]string) provider.Request {
	return provider.Request{LeaseID: id, Params: params, Pod: provider.Pod{Namespace: "ns", Name: "pod", ServiceAccount: "sa"}}
}

func TestIssueRenewRevoke(t *testing.T) {
	ctx := context.Background()
	p, clk := newProvider(t, map[string]*pgengine.Role{"r": {
		DefaultTTL: pgengine.Duration{Duration: time.Minute}, MaxTTL: pgengine.Duration{Duration: 90 * time.Second},
		CreationStatements: []string{create}, Allowed: everyone,
	}})
	params := map[string]string{postgres.ConnectionParam: "main", postgres.RoleParam: "r"}
	l, err := p.Issue(ctx, request("ns-pod-issue001", params))
	if err != nil {
		t.Fatal(err)
	}
	l.ID, l.Params = "ns-pod-issue001", params
	name := l.Values["username"]
	if name != postgres.RoleName(l.ID) || len(l.Values["password"]) != 32 {
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
	p, _ := newProvider(t, map[string]*pgengine.Role{
		"r": {CreationStatements: []string{create}, Allowed: []pgengine.Subject{{Namespace: "ns", ServiceAccount: "other"}}},
	})
	for name, tc := range map[string]struct {
		params map[string]string
		want   error
	}{
		"not allowed":        {map[string]string{postgres.ConnectionParam: "main", postgres.RoleParam: "r"}, provider.ErrPermissionDenied},
		"unknown connection": {map[string]string{postgres.ConnectionParam: "x", postgres.RoleParam: "r"}, provider.ErrInvalidParameters},
		"unknown role":       {map[string]string{postgres.ConnectionParam: "main", postgres.RoleParam: "x"}, provider.ErrInvalidParameters},
		"unknown parameter":  {map[string]string{postgres.ConnectionParam: "main", postgres.RoleParam: "r", "grant": "ALL"}, provider.ErrInvalidParameters},
		"missing role":       {map[string]string{postgres.ConnectionParam: "main"}, provider.ErrInvalidParameters},
	} {
		if _, err := p.Issue(ctx, request("ns-pod-refused", tc.params)); !errors.Is(err, tc.want) {
			t.Errorf("%s: %v, want %v", name, err, tc.want)
		}
	}
	p2, _ := newProvider(t, map[string]*pgengine.Role{"r": {CreationStatements: []string{create}, Allowed: everyone, MaxTTL: pgengine.Duration{Duration: time.Hour}}})
	for _, ttl := range []string{"2h", "1s", "soon"} {
		_, err := p2.Issue(ctx, request("ns-pod-ttl", map[string]string{postgres.ConnectionParam: "main", postgres.RoleParam: "r", postgres.TTLParam: ttl}))
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
	p, _ := newProvider(t, map[string]*pgengine.Role{"r": {
		CreationStatements: []string{create, `SELECT '{{.Password}}'::int`}, Allowed: everyone,
	}})
	_, err := p.Issue(ctx, request("ns-pod-quoted", map[string]string{postgres.ConnectionParam: "main", postgres.RoleParam: "r"}))
	if err == nil {
		t.Fatal("issue succeeded")
	}
	if !strings.Contains(err.Error(), "[redacted]") {
		t.Fatalf("error does not show the redaction (so the test proves nothing): %v", err)
	}
	if errors.Is(err, provider.ErrUnavailable) {
		t.Errorf("a statement error is not an outage: %v", err)
	}
	if ok, _ := pg.RoleExists(ctx, postgres.RoleName("ns-pod-quoted")); ok {
		t.Error("the failed transaction left a role")
	}
}

func TestUnreachableServerIsUnavailable(t *testing.T) {
	p := postgres.NewNode(newIssuer(t, pgengine.Config{Connections: map[string]*pgengine.Connection{"main": {
		URL:   "postgres://u:p@127.0.0.1:1/db?connect_timeout=2",
		Roles: map[string]*pgengine.Role{"r": {CreationStatements: []string{create}, Allowed: everyone}},
	}}}, nil).Local())
	_, err := p.Issue(context.Background(), request("ns-pod-down", map[string]string{postgres.ConnectionParam: "main", postgres.RoleParam: "r"}))
	if !errors.Is(err, provider.ErrUnavailable) {
		t.Fatalf("%v, want ErrUnavailable", err)
	}
	if strings.Contains(err.Error(), "u:p@") {
		t.Fatalf("error quotes the admin URL: %v", err)
	}
}

func TestRoleName(t *testing.T) {
	if got := postgres.RoleName("ns-pod-abcdefgh"); got != "esc_ns_pod_abcdefgh" {
		t.Errorf("RoleName = %q", got)
	}
	long := strings.Repeat("n", 16) + "-" + strings.Repeat("p", 30) + "-abcdefgh"
	got := postgres.RoleName(long)
	if len(got) > 63 || !strings.HasPrefix(got, "esc_nnn") || !strings.HasSuffix(got, "_abcdefgh") || postgres.RoleName(long) != got {
		t.Errorf("RoleName(long) = %q (%d bytes)", got, len(got))
	}
}

// A creation statement that names a missing table is the admin's to fix:
// ErrMisconfigured, not retried, nothing left behind.
func TestMissingTableIsMisconfigured(t *testing.T) {
	ctx := context.Background()
	p, _ := newProvider(t, map[string]*pgengine.Role{"r": {
		CreationStatements: []string{create, `GRANT SELECT ON public.no_such_table TO "{{.Name}}"`}, Allowed: everyone,
	}})
	_, err := p.Issue(ctx, request("ns-pod-notable", map[string]string{postgres.ConnectionParam: "main", postgres.RoleParam: "r"}))
	if !errors.Is(err, provider.ErrMisconfigured) || errors.Is(err, provider.ErrUnavailable) {
		t.Fatalf("%v, want ErrMisconfigured", err)
	}
	if ok, _ := pg.RoleExists(ctx, postgres.RoleName("ns-pod-notable")); ok {
		t.Error("the failed transaction left a role")
	}
}

// Connections the server ends (an admin's pg_terminate_backend, a
// restart: 57P01 or a lost connection) are retried within the call.
func TestTerminatedConnectionsAreRetried(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	p, _ := newProvider(t, map[string]*pgengine.Role{"r": {CreationStatements: []string{create}, Allowed: everyone}})
	params := map[string]string{postgres.ConnectionParam: "main", postgres.RoleParam: "r"}
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
		if ok, _ := pg.RoleExists(ctx, postgres.RoleName(id)); ok {
			t.Errorf("role of %s survives", id)
		}
	}
}

// The verifier and the pod identity come from a node: anything but their
// expected form is refused before a statement is made of them.
func TestMintRefusesMalformedInput(t *testing.T) {
	ctx := context.Background()
	m := newIssuer(t, pgengine.Config{Connections: map[string]*pgengine.Connection{"main": {URL: pg.AdminURL(),
		Roles: map[string]*pgengine.Role{"r": {CreationStatements: []string{create}, Allowed: everyone}}}}}, nil).Local()
	good, _ := postgres.ScramVerifier("x")
	params := map[string]string{postgres.ConnectionParam: "main", postgres.RoleParam: "r"}
	pod := provider.Pod{Namespace: "ns", Name: "pod", ServiceAccount: "sa"}
	for name, r := range map[string]postgres.MintRequest{
		"verifier":  {LeaseID: "ns-pod-bad1", Params: params, Pod: pod, Verifier: good + `'; DROP ROLE postgres; --`},
		"empty":     {LeaseID: "ns-pod-bad2", Params: params, Pod: pod},
		"lease ID":  {LeaseID: "ns pod'bad3", Params: params, Pod: pod, Verifier: good},
		"pod name":  {LeaseID: "ns-pod-bad4", Params: params, Pod: provider.Pod{Namespace: "ns", Name: "p' x", ServiceAccount: "sa"}, Verifier: good},
		"the class": {LeaseID: "ns-pod-bad5", Params: params, Pod: pod, Class: "ns/x y", Verifier: good},
	} {
		if _, err := m.Mint(ctx, r); !errors.Is(err, provider.ErrInvalidParameters) {
			t.Errorf("%s: %v, want ErrInvalidParameters", name, err)
		}
	}
	if n, _ := pg.CountRoles(ctx, "esc_ns_pod_bad"); n != 0 {
		t.Errorf("%d roles made of malformed requests", n)
	}
}
