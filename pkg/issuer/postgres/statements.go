package postgres

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"text/template"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

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
// failed may be quoted in a PostgreSQL error, verifier and all; the
// SQLSTATE is kept for the error's class.
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
