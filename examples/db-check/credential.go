package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strings"

	"github.com/jackc/pgx/v5"
)

// credential is what db-check logs in with.
type credential struct {
	host, port, database, user, password string
	sslMode, sslRootCert                 string
}

// source is a credential file and its format, read again at each login
// (the driver rotates the file in place).
type source struct {
	path  string
	parse func([]byte) (map[string]string, error)
}

// keys are the names each field may have: the PG* variables libpq reads
// (pg.env in examples/postgres), then the driver's `format: env` and
// `format: json` names.
var keys = []struct {
	names []string
	field func(*credential) *string
	need  bool
}{
	{[]string{"PGHOST", "HOST", "host"}, func(c *credential) *string { return &c.host }, true},
	{[]string{"PGPORT", "PORT", "port"}, func(c *credential) *string { return &c.port }, false},
	{[]string{"PGDATABASE", "DATABASE", "database"}, func(c *credential) *string { return &c.database }, false},
	{[]string{"PGUSER", "USERNAME", "username"}, func(c *credential) *string { return &c.user }, true},
	{[]string{"PGPASSWORD", "PASSWORD", "password"}, func(c *credential) *string { return &c.password }, true},
	{[]string{"PGSSLMODE", "SSLMODE", "sslmode"}, func(c *credential) *string { return &c.sslMode }, false},
	{[]string{"PGSSLROOTCERT", "SSLROOTCERT", "sslrootcert"}, func(c *credential) *string { return &c.sslRootCert }, false},
}

// read reads and parses the file. Errors never quote the file's content.
func (s source) read() (credential, error) {
	var c credential
	b, err := os.ReadFile(s.path)
	if err != nil {
		return c, err
	}
	m, err := s.parse(b)
	if err != nil {
		return c, fmt.Errorf("%s: %w", s.path, err)
	}
	for _, k := range keys {
		for _, n := range k.names {
			if v, ok := m[n]; ok {
				*k.field(&c) = v
				break
			}
		}
		if k.need && *k.field(&c) == "" {
			return c, fmt.Errorf("%s has no %s", s.path, strings.Join(k.names, " or "))
		}
	}
	return c, nil
}

// parseEnv reads KEY=value lines ("export " allowed, # comments). A value
// that starts with a single quote is shell-quoted, the way the driver's
// `format: env` writes every value ('...' with '\” for a quote); any other
// value is taken as it is, the way a template such as examples/postgres's
// pg.env writes it.
func parseEnv(b []byte) (map[string]string, error) {
	m := map[string]string{}
	for i, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(strings.TrimPrefix(line, "export "), "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("line %d is not KEY=value", i+1)
		}
		if strings.HasPrefix(v, "'") {
			var err error
			if v, err = unquote(v); err != nil {
				return nil, fmt.Errorf("line %d (%s): %w", i+1, k, err)
			}
		}
		m[k] = v
	}
	return m, nil
}

// unquote undoes shell quoting: '...' is literal, \x is x, the rest as is.
func unquote(v string) (string, error) {
	var b strings.Builder
	for i := 0; i < len(v); i++ {
		switch v[i] {
		case '\'':
			j := strings.IndexByte(v[i+1:], '\'')
			if j < 0 {
				return "", fmt.Errorf("unterminated quote")
			}
			b.WriteString(v[i+1 : i+1+j])
			i += j + 1
		case '\\':
			if i+1 < len(v) {
				i++
			}
			b.WriteByte(v[i])
		default:
			b.WriteByte(v[i])
		}
	}
	return b.String(), nil
}

// parseJSON reads the driver's `format: json`: an object of strings.
func parseJSON(b []byte) (map[string]string, error) {
	m := map[string]string{}
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("not a JSON object of strings")
	}
	return m, nil
}

// connect logs in. The password goes into a keyword/value connection
// string, quoted, and never into an error (see scrub).
func (c credential) connect(ctx context.Context) (*pgx.Conn, error) {
	kv := []string{"host", c.host, "user", c.user, "password", c.password, "connect_timeout", "10"}
	for _, p := range [][2]string{{"port", c.port}, {"dbname", c.database}, {"sslmode", c.sslMode}, {"sslrootcert", c.sslRootCert}} {
		if p[1] != "" {
			kv = append(kv, p[0], p[1])
		}
	}
	var dsn strings.Builder
	for i := 0; i < len(kv); i += 2 {
		v := strings.NewReplacer(`\`, `\\`, `'`, `\'`).Replace(kv[i+1])
		fmt.Fprintf(&dsn, "%s='%s' ", kv[i], v)
	}
	cfg, err := pgx.ParseConfig(dsn.String())
	if err != nil {
		return nil, err
	}
	return pgx.ConnectConfig(ctx, cfg)
}

// scrub is err's message without the password, whatever a library put in.
func (c credential) scrub(err error) string {
	msg := err.Error()
	if c.password != "" {
		msg = strings.ReplaceAll(msg, c.password, "[redacted]")
	}
	return msg
}
