package postgres

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// Admin holds the admin connections of a Config and makes, extends and
// drops the roles the configuration describes, each in a transaction,
// tagging every role it makes (Tag). It never touches a role without its
// tag. Whether a role may be made, until when it lives and whether it
// goes are its caller's decisions (pkg/issuer).
type Admin struct {
	cfg Config

	mu    sync.Mutex
	pools map[string]*pgxpool.Pool
}

// Admin connection pool: bounded by the connection's maxConns, and idle
// connections are closed, so a quiet driver holds none.
const (
	poolIdleTime    = 30 * time.Second
	poolHealthCheck = 10 * time.Second
)

// NewAdmin checks cfg, fills in its defaults and returns an Admin that
// connects lazily.
func NewAdmin(cfg Config) (*Admin, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	return &Admin{cfg: cfg, pools: map[string]*pgxpool.Pool{}}, nil
}

// Close closes the admin connections.
func (a *Admin) Close() {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, pool := range a.pools {
		pool.Close()
	}
	a.pools = map[string]*pgxpool.Pool{}
}

// Connections lists the configured connections' names, sorted.
func (a *Admin) Connections() []string {
	out := make([]string, 0, len(a.cfg.Connections))
	for n := range a.cfg.Connections {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

// Lookup returns the configuration of role of connection, its defaults
// filled in (ErrInvalidParameters when either is not configured). The
// caller reads what it decides with from it; it must not change it.
func (a *Admin) Lookup(connection, role string) (*Connection, *Role, error) {
	conn := a.cfg.Connections[connection]
	if conn == nil {
		return nil, nil, fmt.Errorf("%w: no connection %q is configured", provider.ErrInvalidParameters, connection)
	}
	r := conn.Roles[role]
	if r == nil {
		return nil, nil, fmt.Errorf("%w: connection %q has no role %q", provider.ErrInvalidParameters, connection, role)
	}
	return conn, r, nil
}

func (a *Admin) pool(name string) (*pgxpool.Pool, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if pool, ok := a.pools[name]; ok {
		return pool, nil
	}
	conn := a.cfg.Connections[name]
	pc, err := pgxpool.ParseConfig(conn.URL)
	if err != nil {
		return nil, fmt.Errorf("connection %q: url cannot be parsed", name)
	}
	pc.MaxConns = conn.MaxConns
	pc.MinConns = 0
	pc.MaxConnIdleTime = poolIdleTime
	pc.HealthCheckPeriod = poolHealthCheck
	if pc.ConnConfig.ConnectTimeout == 0 || pc.ConnConfig.ConnectTimeout > 5*time.Second {
		pc.ConnConfig.ConnectTimeout = 5 * time.Second
	}
	pool, err := pgxpool.NewWithConfig(context.Background(), pc)
	if err != nil {
		return nil, fmt.Errorf("%w: connection %q: %v", provider.ErrUnavailable, name, err)
	}
	a.pools[name] = pool
	return pool, nil
}

// Creation is a role to make.
type Creation struct {
	// Connection and Role name the configuration's role whose creation
	// statements make it.
	Connection, Role string
	// Name is the role's name (of [a-z0-9_]).
	Name string
	// Verifier is the SCRAM-SHA-256 verifier the node made; never logged,
	// scrubbed from errors.
	Verifier string
	// ExpiresAt is the role's VALID UNTIL.
	ExpiresAt time.Time
	// Tag is what the role's comment records; its Role is set to
	// "Connection/Role".
	Tag Tag
	// Quota, when Admit is set, names the transaction-scoped advisory
	// lock under which Admit runs, so that concurrent creations of the
	// same quota (by any replica of the issuer) are admitted one after
	// the other.
	Quota string
	// Admit, when set, runs first in the creating transaction, under the
	// Quota's lock, with every role the driver tagged on the server; an
	// error from it refuses the creation and nothing is made.
	Admit func(tagged []TaggedRole) error
}

// Create makes c's role in one transaction: Admit under its lock, the
// creation statements, then the VALID UNTIL and the tag, whatever the
// statements said. A role of that name that exists already fails it
// (ErrUnavailable: an earlier attempt may have committed).
func (a *Admin) Create(ctx context.Context, c Creation) error {
	_, role, err := a.Lookup(c.Connection, c.Role)
	if err != nil {
		return err
	}
	c.Tag.Role = c.Connection + "/" + c.Role
	if err := c.Tag.Check(); err != nil {
		return err
	}
	if err := CheckVerifier(c.Verifier); err != nil {
		return err
	}
	pool, err := a.pool(c.Connection)
	if err != nil {
		return err
	}
	stmts, err := renderAll(role.creation, stmtData{Name: c.Name, Password: c.Verifier}, c.ExpiresAt)
	if err != nil {
		return scrub(err, c.Verifier)
	}
	ident := pgx.Identifier{c.Name}.Sanitize()
	// The role always ends, whatever the admin's statements say, and
	// always carries its tag.
	stmts = append(stmts,
		fmt.Sprintf(`ALTER ROLE %s VALID UNTIL '%s'`, ident, pgTime(c.ExpiresAt)),
		fmt.Sprintf(`COMMENT ON ROLE %s IS '%s'`, ident, c.Tag))
	return withRetry(ctx, "creating role", func(ctx context.Context) (bool, error) {
		unknown, err := inTx(ctx, pool, func(tx pgx.Tx) error {
			if c.Admit != nil {
				if err := admit(ctx, tx, c.Quota, c.Admit); err != nil {
					return err
				}
			}
			return execAll(ctx, tx, stmts)
		})
		if err != nil {
			err = scrub(err, c.Verifier)
		}
		return unknown, err
	})
}

// admit takes the quota's advisory lock, held until the transaction
// ends, lists the tagged roles and asks fn.
func admit(ctx context.Context, tx pgx.Tx, quota string, fn func([]TaggedRole) error) error {
	h := fnv.New64a()
	fmt.Fprintf(h, "ephemeral-secrets-csi maxLive %s", quota)
	if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1)`, int64(h.Sum64())); err != nil {
		return err
	}
	roles, err := listTagged(ctx, tx)
	if err != nil {
		return err
	}
	return fn(roles)
}

type execer interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
}

func execAll(ctx context.Context, e execer, stmts []string) error {
	for _, s := range stmts {
		if _, err := e.Exec(ctx, s); err != nil {
			return err
		}
	}
	return nil
}

// Extend moves the VALID UNTIL of role name, made for leaseID as role of
// connection, in one transaction under the role's lock (which Drop takes
// too): until gets the role as the database has it and returns its new
// VALID UNTIL, or an error that refuses; the role's renew statements then
// run. It returns the role as extended. A role that is gone is
// ErrNotRenewable; one without leaseID's tag ErrPermissionDenied.
func (a *Admin) Extend(ctx context.Context, connection, role, name, leaseID string, until func(cur TaggedRole) (time.Time, error)) (TaggedRole, error) {
	_, r, err := a.Lookup(connection, role)
	if err != nil {
		return TaggedRole{}, err
	}
	pool, err := a.pool(connection)
	if err != nil {
		return TaggedRole{}, err
	}
	var out TaggedRole
	err = withRetry(ctx, "renewing role", func(ctx context.Context) (bool, error) {
		return inTx(ctx, pool, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1)`, roleLock(name)); err != nil {
				return err
			}
			cur, err := tagged(ctx, tx, name, leaseID)
			if errors.Is(err, errNoRole) {
				return fmt.Errorf("%w: role %s no longer exists", provider.ErrNotRenewable, name)
			}
			if err != nil {
				return err
			}
			exp, err := until(cur)
			if err != nil {
				return err
			}
			stmts, err := renderAll(r.renew, stmtData{Name: name}, exp)
			if err != nil {
				return err
			}
			if err := execAll(ctx, tx, stmts); err != nil {
				return err
			}
			cur.ValidUntil = exp
			out = cur
			return nil
		})
	})
	return out, err
}

// Drop ends role name of connection, made for leaseID: refuses its
// logins, ends its sessions, drops what it owns and drops it, with the
// revocation statements of the role it was made as (the defaults when the
// configuration no longer has it). A role that does not exist is dropped
// already; one without leaseID's tag is refused (ErrPermissionDenied) and
// left alone. still, when set, is asked under the role's lock (which
// Extend takes too) with the role as it is then: false leaves it alone,
// so a reaper that decided on a listing does not drop a role extended
// since. dropped reports whether the statements ran.
//
// The role is first made unable to log in, committed on its own: the
// revocation statements then run in one transaction, and inside it a
// NOLOGIN is not yet seen by new logins, so without that fence a session
// could start between the statement that ends the sessions and the
// commit and outlive its role. A failure of the statements rolls them all
// back: the role is left whole (its objects, the admin's membership
// undone) but unable to log in, and the next call drops it.
func (a *Admin) Drop(ctx context.Context, connection, name, leaseID string, still func(TaggedRole) bool) (dropped bool, err error) {
	conn := a.cfg.Connections[connection]
	if conn == nil {
		return false, fmt.Errorf("%w: no connection %q is configured", provider.ErrInvalidParameters, connection)
	}
	pool, err := a.pool(connection)
	if err != nil {
		return false, err
	}
	// Each attempt looks again whether the role is there: a statement
	// that ran before a connection was lost is not run twice.
	err = withRetry(ctx, "dropping role", func(ctx context.Context) (bool, error) {
		dropped = false
		c, err := pool.Acquire(ctx)
		if err != nil {
			return false, err
		}
		defer c.Release()
		key := roleLock(name)
		if _, err := c.Exec(ctx, `SELECT pg_advisory_lock($1)`, key); err != nil {
			return false, err
		}
		defer func() {
			uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			defer cancel()
			if _, err := c.Exec(uctx, `SELECT pg_advisory_unlock($1)`, key); err != nil {
				_ = c.Conn().Close(uctx) // the lock goes with the session, not back to the pool
			}
		}()
		cur, err := tagged(ctx, c, name, leaseID)
		if errors.Is(err, errNoRole) {
			return false, nil
		}
		if err != nil {
			return false, err
		}
		if still != nil && !still(cur) {
			return false, nil
		}
		revoke := conn.defaultRevoke
		if _, rname, _ := strings.Cut(cur.Tag.Role, "/"); conn.Roles[rname] != nil {
			revoke = conn.Roles[rname].revoke
		}
		stmts, err := renderAll(revoke, stmtData{Name: name}, time.Time{})
		if err != nil {
			return false, err
		}
		if _, err := c.Exec(ctx, fmt.Sprintf(`ALTER ROLE %s NOLOGIN`, pgx.Identifier{name}.Sanitize())); err != nil {
			return false, err
		}
		tx, err := c.Begin(ctx)
		if err != nil {
			return false, err
		}
		if err := execAll(ctx, tx, stmts); err != nil {
			_ = tx.Rollback(context.WithoutCancel(ctx))
			return false, err
		}
		// A COMMIT whose outcome is unknown is retried: the next attempt
		// finds the role gone, or drops it.
		if err := tx.Commit(ctx); err != nil {
			return false, err
		}
		dropped = true
		return false, nil
	})
	return dropped, err
}

// roleLock is the advisory lock key of a role: Extend holds it for its
// transaction, a drop while it decides and runs.
func roleLock(name string) int64 {
	h := fnv.New64a()
	fmt.Fprintf(h, "ephemeral-secrets-csi role %s", name)
	return int64(h.Sum64())
}

// Find returns the role name of connection if it is leaseID's; found is
// false when there is no such role, and a role that is not leaseID's
// (untagged, another lease's) is ErrPermissionDenied.
func (a *Admin) Find(ctx context.Context, connection, name, leaseID string) (r TaggedRole, found bool, err error) {
	if a.cfg.Connections[connection] == nil {
		return r, false, fmt.Errorf("%w: no connection %q is configured", provider.ErrInvalidParameters, connection)
	}
	pool, err := a.pool(connection)
	if err != nil {
		return r, false, err
	}
	err = withRetry(ctx, "reading role", func(ctx context.Context) (bool, error) {
		r, err = tagged(ctx, pool, name, leaseID)
		found = err == nil
		if errors.Is(err, errNoRole) {
			return false, nil // an answer, not a failure to retry
		}
		return false, err
	})
	return r, found, err
}

// TaggedRole is a role the driver made, as the database has it.
type TaggedRole struct {
	Name string
	Tag  Tag
	// ValidUntil is the role's VALID UNTIL; the zero time when it has
	// none (someone altered it).
	ValidUntil time.Time
}

// Tagged lists the roles of connection's server that the driver made
// through that connection (their tag names it).
func (a *Admin) Tagged(ctx context.Context, connection string) ([]TaggedRole, error) {
	if a.cfg.Connections[connection] == nil {
		return nil, fmt.Errorf("%w: no connection %q is configured", provider.ErrInvalidParameters, connection)
	}
	pool, err := a.pool(connection)
	if err != nil {
		return nil, err
	}
	var out []TaggedRole
	err = withRetry(ctx, "listing roles", func(ctx context.Context) (bool, error) {
		all, err := listTagged(ctx, pool)
		if err != nil {
			return false, err
		}
		out = out[:0]
		for _, r := range all {
			if c, _, _ := strings.Cut(r.Tag.Role, "/"); c == connection {
				out = append(out, r)
			}
		}
		return false, nil
	})
	return out, err
}

type querier interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// Role comments live in pg_shdescription, readable by every role.
const taggedRolesSQL = `SELECT r.rolname, r.rolvaliduntil, d.description FROM pg_roles r
	JOIN pg_shdescription d ON d.objoid = r.oid AND d.classoid = 'pg_authid'::regclass
	WHERE starts_with(d.description, $1)`

func listTagged(ctx context.Context, q querier) ([]TaggedRole, error) {
	rows, err := q.Query(ctx, taggedRolesSQL, tagPrefix)
	if err != nil {
		return nil, err
	}
	var out []TaggedRole
	for rows.Next() {
		var name, comment string
		var until pgtype.Timestamptz
		if err := rows.Scan(&name, &until, &comment); err != nil {
			rows.Close()
			return nil, err
		}
		if tag, ok := parseTag(comment); ok {
			out = append(out, TaggedRole{Name: name, Tag: tag, ValidUntil: validUntil(until)})
		}
	}
	return out, rows.Err()
}

var errNoRole = errors.New("no such role")

// tagged reads the role name and checks that it is leaseID's: errNoRole
// when there is no such role, ErrPermissionDenied when it is not the
// driver's or not that lease's.
func tagged(ctx context.Context, q querier, name, leaseID string) (TaggedRole, error) {
	var until pgtype.Timestamptz
	var comment pgtype.Text
	err := q.QueryRow(ctx, `SELECT rolvaliduntil, shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = $1`, name).
		Scan(&until, &comment)
	if errors.Is(err, pgx.ErrNoRows) {
		return TaggedRole{}, errNoRole
	}
	if err != nil {
		return TaggedRole{}, err
	}
	tag, ok := parseTag(comment.String)
	if !ok || tag.LeaseID != leaseID {
		return TaggedRole{}, fmt.Errorf("%w: role %s exists but was not made by this driver for lease %s; left alone",
			provider.ErrPermissionDenied, name, leaseID)
	}
	return TaggedRole{Name: name, Tag: tag, ValidUntil: validUntil(until)}, nil
}

func validUntil(t pgtype.Timestamptz) time.Time {
	if !t.Valid || t.InfinityModifier != pgtype.Finite {
		return time.Time{}
	}
	return t.Time
}
