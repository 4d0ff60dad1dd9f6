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

func newProvider(t *testing.T, roles map[string]*Role) *Provider {
	t.Helper()
	p, err := New(Config{Connections: map[string]*Connection{"main": {URL: pg.AdminURL(), Roles: roles}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	return p
}

var everyone = []Subject{{Namespace: "*", ServiceAccount: "*"}}

func request(id string, params map[string]string) provider.Request {
	return provider.Request{LeaseID: id, Params: params, Pod: provider.Pod{Namespace: "ns", Name: "pod", ServiceAccount: "sa"}}
}

func TestIssueRenewRevoke(t *testing.T) {
	ctx := context.Background()
	p := newProvider(t, map[string]*Role{"r": {
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
	p.now = func() time.Time { return l.IssuedAt.Add(20 * time.Second) }
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
	p.now = func() time.Time { return l.IssuedAt.Add(60 * time.Second) }
	if r, err = p.Renew(ctx, r); err != nil || !r.ExpiresAt.Equal(l.IssuedAt.Add(90*time.Second)) {
		t.Fatalf("renewal up to maxTTL: %v, expires %s", err, r.ExpiresAt)
	}
	p.now = func() time.Time { return l.IssuedAt.Add(85 * time.Second) }
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
	p := newProvider(t, map[string]*Role{
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
	p2 := newProvider(t, map[string]*Role{"r": {CreationStatements: []string{create}, Allowed: everyone, MaxTTL: Duration{time.Hour}}})
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

// A failing creation statement that quotes the password must not carry it
// into the error, and the transaction leaves no role.
func TestFailedIssueNeverQuotesThePassword(t *testing.T) {
	ctx := context.Background()
	p := newProvider(t, map[string]*Role{"r": {
		CreationStatements: []string{create, `SELECT '{{.PlainPassword}}'::int`}, Allowed: everyone,
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
