package postgres

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/test/pgtest"
)

var pg *pgtest.Server

func TestMain(m *testing.M) { pgtest.Main(m, &pg) }

const create = `CREATE ROLE "{{.Name}}" LOGIN PASSWORD '{{.Password}}' VALID UNTIL '{{.Expiration}}'`

var everyone = []Subject{{Namespace: "*", ServiceAccount: "*"}}

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
		_, err := NewAdmin(cfg)
		if err == nil {
			t.Errorf("%s: accepted", name)
		} else if strings.Contains(err.Error(), "SECRET") {
			t.Errorf("%s: error quotes the URL's password: %v", name, err)
		}
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

// Configurations written for the node-side provider that quoted the
// plaintext password are refused at load, saying why.
func TestPlainPasswordIsRefusedAtLoad(t *testing.T) {
	_, err := NewAdmin(Config{Connections: map[string]*Connection{"c": {URL: "postgres://localhost/db", Roles: map[string]*Role{"r": {
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
	name := roleName("ns-pod-untagged")
	other := roleName("ns-pod-othertag")
	if err := pg.Exec(ctx, `CREATE ROLE `+name+` LOGIN VALID UNTIL '2000-01-01'`,
		`CREATE ROLE `+other+` LOGIN VALID UNTIL '2000-01-01'`,
		`COMMENT ON ROLE `+other+` IS '`+tagPrefix+`lease=ns-pod-someone-else created=2000-01-01T00:00:00Z'`); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = pg.Exec(ctx, `DROP ROLE IF EXISTS `+name, `DROP ROLE IF EXISTS `+other) }()
	for _, id := range []string{"ns-pod-untagged", "ns-pod-othertag"} {
		if _, err := a.Drop(ctx, "main", roleName(id), id, nil); !errors.Is(err, provider.ErrPermissionDenied) {
			t.Errorf("drop %s: %v, want ErrPermissionDenied", id, err)
		}
		if _, err := a.Extend(ctx, "main", "r", roleName(id), id, inAnHour); !errors.Is(err, provider.ErrPermissionDenied) {
			t.Errorf("extend %s: %v, want ErrPermissionDenied", id, err)
		}
		if ok, _ := pg.RoleExists(ctx, roleName(id)); !ok {
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

func newAdmin(t *testing.T) *Admin {
	t.Helper()
	a, err := NewAdmin(Config{Connections: map[string]*Connection{"main": {URL: pg.AdminURL(),
		Roles: map[string]*Role{"r": {CreationStatements: []string{create}, Allowed: everyone}}}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(a.Close)
	return a
}

// roleName is the node's name for a lease's role (pkg/provider/postgres
// RoleName) for the short IDs of these tests.
func roleName(leaseID string) string { return "esc_" + strings.ReplaceAll(leaseID, "-", "_") }

func inAnHour(TaggedRole) (time.Time, error) { return time.Now().Add(time.Hour), nil }

// verifier is a well-formed SCRAM-SHA-256 verifier (of the password "x").
const verifier = "SCRAM-SHA-256$4096:c2FsdHNhbHRzYWx0c2FsdA==$N0dV2ZbyDlAkxbyj6A9Be9+SNyM/UV6MDi44GuTpqPw=:KnyGjpa1qNO3SpO/yWxC3OvvHDa2u3ytMdmBgqmC1ng="

// makeRole creates lease id's tagged role through a.
func makeRole(ctx context.Context, t *testing.T, a *Admin, id string) string {
	t.Helper()
	name := roleName(id)
	err := a.Create(ctx, Creation{Connection: "main", Role: "r", Name: name, Verifier: verifier,
		ExpiresAt: time.Now().Add(time.Hour).UTC().Truncate(time.Second),
		Tag:       Tag{LeaseID: id, Pod: provider.Pod{Namespace: "ns", Name: "pod", ServiceAccount: "sa"}, Created: time.Now().UTC().Truncate(time.Second)}})
	if err != nil {
		t.Fatal(err)
	}
	return name
}

// A drop whose statements fail part-way leaves the role whole (what it
// owns, the admin's membership undone) but unable to log in, and the next
// drop completes. The failure here is a real one: the role owns a table
// in another database, which DROP OWNED (of the connection's database)
// does not reach, so DROP ROLE fails (2BP01) after DROP OWNED ran.
func TestDropIsAtomic(t *testing.T) {
	ctx := context.Background()
	a := newAdmin(t)
	name := makeRole(ctx, t, a, "ns-pod-halfdrop")
	if err := pg.Exec(ctx, `CREATE DATABASE halfdrop`, `CREATE TABLE halfdrop_here (x int)`,
		`ALTER TABLE halfdrop_here OWNER TO `+name); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = pg.Exec(ctx, `DROP TABLE IF EXISTS halfdrop_here`, `DROP DATABASE IF EXISTS halfdrop`) }()
	if err := pg.ExecIn(ctx, "halfdrop", `CREATE TABLE elsewhere (x int)`, `ALTER TABLE elsewhere OWNER TO `+name); err != nil {
		t.Fatal(err)
	}
	dropped, err := a.Drop(ctx, "main", name, "ns-pod-halfdrop", nil)
	if err == nil || dropped {
		t.Fatalf("drop with an object in another database: dropped %v, %v; want a failure", dropped, err)
	}
	if !errors.Is(err, provider.ErrUnavailable) {
		t.Errorf("%v, want ErrUnavailable (retried later)", err)
	}
	var owner string
	if err := queryRow(ctx, `SELECT tableowner FROM pg_tables WHERE tablename = 'halfdrop_here'`, &owner); err != nil || owner != name {
		t.Errorf("the role's table in the connection's database: owner %q, %v; want it kept, owned by %s", owner, err, name)
	}
	var members int
	if err := queryRow(ctx, `SELECT count(*) FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid WHERE r.rolname = '`+name+`'`, &members); err != nil || members != 0 {
		t.Errorf("the role has %d members after a failed drop (the admin's GRANT stayed): %v", members, err)
	}
	var login bool
	if err := queryRow(ctx, `SELECT rolcanlogin FROM pg_roles WHERE rolname = '`+name+`'`, &login); err != nil || login {
		t.Errorf("the role can log in after a failed drop: %v, %v", login, err)
	}
	if err := pg.ExecIn(ctx, "halfdrop", `DROP TABLE elsewhere`); err != nil {
		t.Fatal(err)
	}
	if dropped, err := a.Drop(ctx, "main", name, "ns-pod-halfdrop", nil); err != nil || !dropped {
		t.Fatalf("the second drop: %v, %v", dropped, err)
	}
	if ok, _ := pg.RoleExists(ctx, name); ok {
		t.Error("the role survives the second drop")
	}
}

// queryRow reads one row of the test server as its superuser.
func queryRow(ctx context.Context, sql string, dest ...any) error {
	conn, err := pgx.Connect(ctx, pg.AdminURL())
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	return conn.QueryRow(ctx, sql).Scan(dest...)
}
