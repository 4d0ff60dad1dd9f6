// Package postgres is the built-in provider that mints PostgreSQL roles:
// one role per pod volume, created with a VALID UNTIL, extended on renewal
// and dropped at revocation.
package postgres

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"strings"
	"sync"
	"text/template"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// Name is the provider name a SecretProviderClass gives as spec.provider.
const Name = "postgres"

// Class parameters.
const (
	ConnectionParam = "connection"
	RoleParam       = "role"
	TTLParam        = "ttl"
)

// Handle keys.
const (
	handleConnection = "connection"
	handleRole       = "role"
	handleName       = "name"
	handleNotAfter   = "notAfter"
)

// Provider implements provider.Provider for PostgreSQL.
type Provider struct {
	cfg Config
	now func() time.Time

	mu    sync.Mutex
	pools map[string]*pgxpool.Pool
}

var _ provider.Provider = (*Provider)(nil)

// New checks cfg and returns a provider. It connects lazily.
func New(cfg Config) (*Provider, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	return &Provider{cfg: cfg, now: time.Now, pools: map[string]*pgxpool.Pool{}}, nil
}

// Close closes the admin connections.
func (p *Provider) Close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, pool := range p.pools {
		pool.Close()
	}
	p.pools = map[string]*pgxpool.Pool{}
}

func (p *Provider) pool(name string) (*pgxpool.Pool, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if pool, ok := p.pools[name]; ok {
		return pool, nil
	}
	conn := p.cfg.Connections[name]
	pc, err := pgxpool.ParseConfig(conn.URL)
	if err != nil {
		return nil, fmt.Errorf("connection %q: url cannot be parsed", name)
	}
	pc.MaxConns = conn.MaxConns
	if pc.ConnConfig.ConnectTimeout == 0 || pc.ConnConfig.ConnectTimeout > 5*time.Second {
		pc.ConnConfig.ConnectTimeout = 5 * time.Second
	}
	pool, err := pgxpool.NewWithConfig(context.Background(), pc)
	if err != nil {
		return nil, fmt.Errorf("%w: connection %q: %v", provider.ErrUnavailable, name, err)
	}
	p.pools[name] = pool
	return pool, nil
}

type target struct {
	connName, roleName string
	conn               *Connection
	role               *Role
}

func (p *Provider) lookup(params map[string]string) (target, error) {
	for k := range params {
		if k != ConnectionParam && k != RoleParam && k != TTLParam {
			return target{}, fmt.Errorf("%w: unknown parameter %q for provider postgres (it takes %s, %s, %s)",
				provider.ErrInvalidParameters, k, ConnectionParam, RoleParam, TTLParam)
		}
	}
	t := target{connName: params[ConnectionParam], roleName: params[RoleParam]}
	if t.connName == "" || t.roleName == "" {
		return t, fmt.Errorf("%w: parameters %q and %q are required", provider.ErrInvalidParameters, ConnectionParam, RoleParam)
	}
	t.conn = p.cfg.Connections[t.connName]
	if t.conn == nil {
		return t, fmt.Errorf("%w: no connection %q is configured", provider.ErrInvalidParameters, t.connName)
	}
	t.role = t.conn.Roles[t.roleName]
	if t.role == nil {
		return t, fmt.Errorf("%w: connection %q has no role %q", provider.ErrInvalidParameters, t.connName, t.roleName)
	}
	return t, nil
}

// Issue creates a role that expires after the class's TTL.
func (p *Provider) Issue(ctx context.Context, req provider.Request) (provider.Lease, error) {
	t, err := p.lookup(req.Params)
	if err != nil {
		return provider.Lease{}, err
	}
	allowed := false
	for _, s := range t.role.Allowed {
		allowed = allowed || s.matches(req.Pod.Namespace, req.Pod.ServiceAccount)
	}
	if !allowed {
		return provider.Lease{}, fmt.Errorf("%w: service account %s/%s may not use role %q of connection %q",
			provider.ErrPermissionDenied, req.Pod.Namespace, req.Pod.ServiceAccount, t.roleName, t.connName)
	}
	ttl := t.role.DefaultTTL.Duration
	if s := req.Params[TTLParam]; s != "" {
		if ttl, err = time.ParseDuration(s); err != nil || ttl < 5*time.Second {
			return provider.Lease{}, fmt.Errorf("%w: ttl %q is not a duration of at least 5s", provider.ErrInvalidParameters, s)
		}
		if ttl > t.role.MaxTTL.Duration {
			return provider.Lease{}, fmt.Errorf("%w: ttl %s exceeds the role's maxTTL %s", provider.ErrInvalidParameters, ttl, t.role.MaxTTL.Duration)
		}
	}
	name := RoleName(req.LeaseID)
	password := newPassword()
	now := p.now().UTC().Truncate(time.Second)
	exp := now.Add(ttl)
	notAfter := now.Add(t.role.MaxTTL.Duration)

	pool, err := p.pool(t.connName)
	if err != nil {
		return provider.Lease{}, err
	}
	verifier, err := scramVerifier(password)
	if err != nil {
		return provider.Lease{}, err
	}
	stmts, err := renderAll(t.role.creation, stmtData{Name: name, Password: verifier, PlainPassword: password}, exp)
	if err != nil {
		return provider.Lease{}, scrub(err, password, verifier)
	}
	err = withRetry(ctx, "creating role", func(ctx context.Context) (bool, error) {
		unknown, err := inTx(ctx, pool, func(tx pgx.Tx) error {
			for _, s := range stmts {
				if _, err := tx.Exec(ctx, s); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			err = scrub(err, password, verifier)
		}
		return unknown, err
	})
	if err != nil {
		return provider.Lease{}, err
	}
	return provider.Lease{
		Values: map[string]string{"username": name, "password": password},
		Info: map[string]string{
			"host": t.conn.Host, "port": t.conn.Port, "database": t.conn.Database,
		},
		Handle: map[string]string{
			handleConnection: t.connName, handleRole: t.roleName, handleName: name,
			handleNotAfter: notAfter.Format(time.RFC3339),
		},
		Role:      t.connName + "/" + t.roleName,
		IssuedAt:  now,
		ExpiresAt: exp,
	}, nil
}

// Renew moves the role's VALID UNTIL forward by the TTL, up to the role's
// maxTTL after issue; past that it returns ErrNotRenewable.
func (p *Provider) Renew(ctx context.Context, l provider.Lease) (provider.Lease, error) {
	t, err := p.lookup(l.Params)
	if err != nil {
		return l, err
	}
	ttl := t.role.DefaultTTL.Duration
	if s := l.Params[TTLParam]; s != "" {
		if d, err := time.ParseDuration(s); err == nil {
			ttl = d
		}
	}
	now := p.now().UTC().Truncate(time.Second)
	exp := now.Add(ttl)
	if na, err := time.Parse(time.RFC3339, l.Handle[handleNotAfter]); err == nil && exp.After(na) {
		exp = na
	}
	// Not worth a renewal: rotate to a fresh role instead.
	if exp.Sub(l.ExpiresAt) < ttl/10 || !exp.After(now) {
		return l, provider.ErrNotRenewable
	}
	name := l.Handle[handleName]
	if name == "" {
		name = RoleName(l.ID)
	}
	pool, err := p.pool(t.connName)
	if err != nil {
		return l, err
	}
	stmts, err := renderAll(t.role.renew, stmtData{Name: name}, exp)
	if err != nil {
		return l, err
	}
	err = withRetry(ctx, "renewing role", func(ctx context.Context) (bool, error) {
		return inTx(ctx, pool, func(tx pgx.Tx) error {
			var exists bool
			if err := tx.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)`, name).Scan(&exists); err != nil {
				return err
			}
			if !exists {
				return fmt.Errorf("%w: role %s no longer exists", provider.ErrNotRenewable, name)
			}
			for _, s := range stmts {
				if _, err := tx.Exec(ctx, s); err != nil {
					return err
				}
			}
			return nil
		})
	})
	if err != nil {
		return l, err
	}
	l.ExpiresAt = exp
	return l, nil
}

// Revoke ends the role's sessions, drops what it owns and drops it. A
// role that does not exist is already revoked.
func (p *Provider) Revoke(ctx context.Context, l provider.Lease) error {
	params := l.Params
	if params == nil {
		params = map[string]string{ConnectionParam: l.Handle[handleConnection], RoleParam: l.Handle[handleRole]}
	}
	t, err := p.lookup(params)
	if err != nil {
		return err
	}
	name := l.Handle[handleName]
	if name == "" {
		name = RoleName(l.ID) // an issue interrupted before its handle was recorded
	}
	pool, err := p.pool(t.connName)
	if err != nil {
		return err
	}
	stmts, err := renderAll(t.role.revoke, stmtData{Name: name}, time.Time{})
	if err != nil {
		return err
	}
	// Each attempt looks again whether the role is there: a statement
	// that ran before a connection was lost is not run twice.
	return withRetry(ctx, "dropping role", func(ctx context.Context) (bool, error) {
		conn, err := pool.Acquire(ctx)
		if err != nil {
			return false, err
		}
		defer conn.Release()
		var exists bool
		if err := conn.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)`, name).Scan(&exists); err != nil || !exists {
			return false, err
		}
		for _, s := range stmts {
			if _, err := conn.Exec(ctx, s); err != nil {
				return false, err
			}
		}
		return false, nil
	})
}

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
	// stores it as given, and the plaintext never leaves the driver.
	Password string
	// PlainPassword is the password itself, for servers that cannot take a
	// verifier. PostgreSQL logs failing statements: avoid it.
	PlainPassword string
	Expiration    string
}

func renderAll(ts []*template.Template, d stmtData, exp time.Time) ([]string, error) {
	if !exp.IsZero() {
		d.Expiration = exp.UTC().Format("2006-01-02 15:04:05+00")
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
