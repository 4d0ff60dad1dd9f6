package postgres

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"
	"text/template"
	"time"

	"github.com/jackc/pgx/v5"
)

// Config is the admin's configuration of the postgres provider: the
// databases the driver may create roles in and, per database, the roles a
// SecretProviderClass may ask for. It holds admin credentials: in a cluster
// it comes from a Secret mounted into the driver.
type Config struct {
	// Connections are the databases, by a name classes give as their
	// connection parameter (letters, digits, '.', '_' and '-'); at least
	// one.
	Connections map[string]*Connection `json:"connections"`
}

// Connection is one database the driver administers.
type Connection struct {
	// URL is a libpq connection string with credentials allowed to create
	// and drop roles (required; a URL or a key=value string; never quoted
	// in a message).
	URL string `json:"url"`
	// Host is what pods are told to dial (templates see it as host); by
	// default the host of URL.
	Host string `json:"host,omitempty"`
	// Port is the port pods are told (templates: port); by default that of
	// URL.
	Port string `json:"port,omitempty"`
	// Database is the database pods are told (templates: database); by
	// default that of URL.
	Database string `json:"database,omitempty"`
	// MaxConns bounds the admin connections the driver holds (default 4).
	MaxConns int32 `json:"maxConns,omitempty"`
	// Roles are the roles classes may ask for on this connection, by a
	// name classes give as their role parameter (letters, digits, '.', '_'
	// and '-'); at least one.
	Roles map[string]*Role `json:"roles"`
	// ExpectedSources are the networks (CIDR, such as 10.0.3.0/24 or
	// 127.0.0.0/8) sessions of the roles made here may also come from,
	// beside their pod's IPs and its node's addresses: a PgBouncer or
	// proxy in between, or loopback with no cluster. A session from any
	// other address is a foreign use of the credential (see the role's
	// onForeignUse).
	ExpectedSources []string `json:"expectedSources,omitempty"`

	defaultRevoke []*template.Template
	expected      []netip.Prefix
}

// Expected is ExpectedSources, parsed.
func (c *Connection) Expected() []netip.Prefix { return c.expected }

// Role is a template for the roles the driver creates.
type Role struct {
	// DefaultTTL is the lifetime of a credential whose class sets no ttl
	// (default 1h, at least 5s, at most MaxTTL).
	DefaultTTL Duration `json:"defaultTTL"`
	// MaxTTL bounds a role's life from its creation (default 24h):
	// renewals extend it up to this, then a new role is swapped in.
	MaxTTL Duration `json:"maxTTL"`
	// CreationStatements run in one transaction (required; they must use
	// {{.Name}}; {{.PlainPassword}} is refused). Templates see .Name,
	// .Password (the SCRAM-SHA-256 verifier the node made: the password
	// itself never leaves the node) and .Expiration, all safe inside
	// quotes. The driver then sets VALID UNTIL and tags the role
	// (COMMENT ON ROLE) in the same transaction.
	CreationStatements []string `json:"creationStatements"`
	// RenewStatements extend the role (default: ALTER ROLE ... VALID UNTIL).
	RenewStatements []string `json:"renewStatements,omitempty"`
	// RevocationStatements end the role (default: refuse logins, end its
	// sessions, drop what it owns, drop it).
	RevocationStatements []string `json:"revocationStatements,omitempty"`
	// Allowed lists who may use the role (at least one entry); "*"
	// matches any name.
	Allowed []Subject `json:"allowed"`
	// MaxLive caps the live roles one service account holds of this role,
	// across the cluster (0: no cap).
	MaxLive int `json:"maxLive,omitempty"`
	// OnForeignUse is what the issuer does when a credential of this
	// role is used from an address none expected (not its pod's, not its
	// node's, not in the connection's expectedSources): alert (the
	// default: a Warning event on the pod, an audit record, a metric),
	// revoke (all of that, and the kill switch: every session of the role
	// ended, the role dropped, the pod's files withdrawn) or record (an
	// audit record and the Credential's status only).
	OnForeignUse string `json:"onForeignUse,omitempty"`
	// UnusedAfter, when set, is how long a credential of this role may go
	// without a session before the issuer says so (an audit record and a
	// metric: the pod may not need this access).
	UnusedAfter Duration `json:"unusedAfter,omitzero"`

	creation, renew, revoke []*template.Template
}

// What a role's onForeignUse may say.
const (
	ForeignAlert  = "alert"
	ForeignRevoke = "revoke"
	ForeignRecord = "record"
)

// Subject is a namespace and service account.
type Subject struct {
	// Namespace of the pods (required; "*": any).
	Namespace string `json:"namespace"`
	// ServiceAccount the pods run as (required; "*": any).
	ServiceAccount string `json:"serviceAccount"`
}

// Duration is a time.Duration written as "1h30m".
type Duration struct{ time.Duration }

// UnmarshalJSON implements json.Unmarshaler.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("duration must be a string such as \"1h\"")
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return err
	}
	d.Duration = v
	return nil
}

// MarshalJSON implements json.Marshaler.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(d.String()) }

var (
	defaultRenew = []string{`ALTER ROLE "{{.Name}}" VALID UNTIL '{{.Expiration}}'`}
	// The role is made unable to log in first, so no session can start
	// between ending the open ones and dropping it.
	defaultRevoke = []string{
		// Ending the role's sessions and DROP OWNED BY need membership of
		// the role: a superuser has it, a least-privilege CREATEROLE admin
		// takes it first (found with a real cluster whose admin login is
		// not a superuser).
		`GRANT "{{.Name}}" TO CURRENT_USER`,
		`ALTER ROLE "{{.Name}}" NOLOGIN`,
		`SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{{.Name}}' AND pid <> pg_backend_pid()`,
		`DROP OWNED BY "{{.Name}}"`,
		`DROP ROLE IF EXISTS "{{.Name}}"`,
	}
)

// validate checks the configuration and compiles its templates.
func (c *Config) validate() error {
	if len(c.Connections) == 0 {
		return fmt.Errorf("postgres: no connections configured")
	}
	compiledRevoke, err := compile(defaultRevoke)
	if err != nil {
		return err
	}
	for cname, conn := range c.Connections {
		if !configKeyPattern.MatchString(cname) {
			return fmt.Errorf("postgres: connection %q: names are of letters, digits, '.', '_' and '-'", cname)
		}
		if conn == nil || conn.URL == "" {
			return fmt.Errorf("postgres: connection %q: url is empty", cname)
		}
		pc, err := pgx.ParseConfig(conn.URL)
		if err != nil {
			// pgx's message may quote the URL, password included.
			return fmt.Errorf("postgres: connection %q: url cannot be parsed", cname)
		}
		if conn.Host == "" {
			conn.Host = pc.Host
		}
		if conn.Port == "" {
			conn.Port = fmt.Sprint(pc.Port)
		}
		if conn.Database == "" {
			conn.Database = pc.Database
		}
		if conn.MaxConns <= 0 {
			conn.MaxConns = 4
		}
		conn.defaultRevoke = compiledRevoke
		conn.expected = conn.expected[:0]
		for _, cidr := range conn.ExpectedSources {
			p, err := netip.ParsePrefix(strings.TrimSpace(cidr))
			if err != nil {
				return fmt.Errorf("postgres: connection %q: expectedSources: %q is not a network such as 10.0.3.0/24", cname, cidr)
			}
			conn.expected = append(conn.expected, p.Masked())
		}
		if len(conn.Roles) == 0 {
			return fmt.Errorf("postgres: connection %q: no roles configured", cname)
		}
		for rname, r := range conn.Roles {
			where := fmt.Sprintf("postgres: connection %q role %q", cname, rname)
			if r == nil {
				return fmt.Errorf("%s: empty", where)
			}
			if !configKeyPattern.MatchString(rname) {
				return fmt.Errorf("%s: names are of letters, digits, '.', '_' and '-'", where)
			}
			if r.MaxLive < 0 {
				return fmt.Errorf("%s: maxLive is negative", where)
			}
			switch r.OnForeignUse {
			case "":
				r.OnForeignUse = ForeignAlert
			case ForeignAlert, ForeignRevoke, ForeignRecord:
			default:
				return fmt.Errorf("%s: onForeignUse is alert, revoke or record", where)
			}
			if r.UnusedAfter.Duration < 0 {
				return fmt.Errorf("%s: unusedAfter is negative", where)
			}
			if r.DefaultTTL.Duration <= 0 {
				r.DefaultTTL.Duration = time.Hour
			}
			if r.MaxTTL.Duration <= 0 {
				r.MaxTTL.Duration = 24 * time.Hour
			}
			if r.DefaultTTL.Duration > r.MaxTTL.Duration {
				return fmt.Errorf("%s: defaultTTL exceeds maxTTL", where)
			}
			if r.DefaultTTL.Duration < 5*time.Second {
				return fmt.Errorf("%s: defaultTTL below 5s", where)
			}
			if len(r.CreationStatements) == 0 {
				return fmt.Errorf("%s: creationStatements is empty", where)
			}
			if len(r.Allowed) == 0 {
				return fmt.Errorf("%s: allowed is empty: no one could use the role", where)
			}
			for _, s := range r.Allowed {
				if s.Namespace == "" || s.ServiceAccount == "" {
					return fmt.Errorf("%s: allowed entries need namespace and serviceAccount (\"*\" for any)", where)
				}
			}
			for _, st := range [][]string{r.CreationStatements, r.RenewStatements, r.RevocationStatements} {
				if strings.Contains(strings.Join(st, "\n"), ".PlainPassword") {
					return fmt.Errorf("%s: statements use {{.PlainPassword}}, which no longer exists: the password "+
						"never leaves the node; use {{.Password}}, its SCRAM-SHA-256 verifier", where)
				}
			}
			if r.creation, err = compile(r.CreationStatements); err != nil {
				return fmt.Errorf("%s: creationStatements: %w", where, err)
			}
			if !strings.Contains(strings.Join(r.CreationStatements, "\n"), "{{.Name}}") {
				return fmt.Errorf("%s: creationStatements never use {{.Name}}", where)
			}
			if r.renew, err = compile(orDefault(r.RenewStatements, defaultRenew)); err != nil {
				return fmt.Errorf("%s: renewStatements: %w", where, err)
			}
			if r.revoke, err = compile(orDefault(r.RevocationStatements, defaultRevoke)); err != nil {
				return fmt.Errorf("%s: revocationStatements: %w", where, err)
			}
		}
	}
	return nil
}

func orDefault(s, def []string) []string {
	if len(s) == 0 {
		return def
	}
	return s
}

func compile(stmts []string) ([]*template.Template, error) {
	out := make([]*template.Template, len(stmts))
	for i, s := range stmts {
		t, err := template.New(fmt.Sprint(i)).Option("missingkey=error").Parse(s)
		if err != nil {
			return nil, err
		}
		out[i] = t
	}
	return out, nil
}
