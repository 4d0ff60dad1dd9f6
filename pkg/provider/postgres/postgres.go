// Package postgres is the built-in provider of PostgreSQL roles: one role
// per pod volume, created with a VALID UNTIL, extended on renewal and
// dropped at revocation.
//
// It has two sides. The node side (Provider, node.go) makes the password
// and its SCRAM-SHA-256 verifier and asks a Minter for the role; the
// password never leaves the node. The database side (Admin, admin.go)
// holds the admin connections and runs the statements; the issuer
// (pkg/issuer) uses it, in the driver's process or in the cluster.
package postgres

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"strings"
	"text/template"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// Name is the provider name a SecretProviderClass gives as spec.provider.
const Name = "postgres"

// Class parameters.
const (
	ConnectionParam = "connection"
	RoleParam       = "role"
	TTLParam        = "ttl"
)

// RoleName is the PostgreSQL role created for a lease ID: "esc_" and the
// ID with '-' as '_', at most 63 bytes, keeping the random tail.
func RoleName(leaseID string) string {
	s := "esc_" + strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= '0' && r <= '9' {
			return r
		}
		return '_'
	}, strings.ToLower(leaseID))
	if len(s) > 63 {
		s = s[:30] + s[len(s)-33:]
	}
	return s
}

// newPassword returns 32 base32 characters (160 bits), safe inside the
// single quotes of a creation statement.
func newPassword() string {
	return rand.Text() + rand.Text()[:6]
}

// stmtData is what statement templates see.
type stmtData struct {
	// Name is the role's name, of [a-z0-9_].
	Name string
	// Password is the SCRAM-SHA-256 verifier of the password: PostgreSQL
	// stores it as given, and the plaintext never leaves the node.
	Password   string
	Expiration string
}

func renderAll(ts []*template.Template, d stmtData, exp time.Time) ([]string, error) {
	if !exp.IsZero() {
		d.Expiration = pgTime(exp)
	}
	out := make([]string, len(ts))
	for i, t := range ts {
		var b bytes.Buffer
		if err := t.Execute(&b, d); err != nil {
			return nil, fmt.Errorf("statement %d: %w", i+1, err)
		}
		out[i] = b.String()
	}
	return out, nil
}

// scrub removes secret values from an error's text. The statement that
// failed may be quoted in a PostgreSQL error, password and all.
func scrub(err error, secrets ...string) error {
	msg := err.Error()
	changed := false
	for _, s := range secrets {
		if s != "" && strings.Contains(msg, s) {
			msg = strings.ReplaceAll(msg, s, "[redacted]")
			changed = true
		}
	}
	if !changed {
		return err
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return &scrubbed{msg: msg, cause: pgErr.Code}
	}
	return errors.New(msg)
}

type scrubbed struct{ msg, cause string }

func (s *scrubbed) Error() string { return s.msg }

// pgTime writes t as a PostgreSQL timestamptz literal.
func pgTime(t time.Time) string { return t.UTC().Format("2006-01-02 15:04:05+00") }
