package postgres

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"regexp"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// Admin is the database side of the postgres engine: it holds the admin
// connections of a Config and makes, extends and drops the roles the
// configuration describes, applying the configuration's own rules (the
// allowed list, the TTL bounds, maxLive) in the transaction that makes
// the role, and tagging every role it makes (Tag). It never touches a role
// without its tag.
//
// It implements Minter with no cluster in sight: the issuer (pkg/issuer)
// adds the checks against the cluster (the pod exists on the asking node),
// the inventory and the reaper around it.
type Admin struct {
	cfg Config
	now func() time.Time

	mu    sync.Mutex
	pools map[string]*pgxpool.Pool
}

var _ Minter = (*Admin)(nil)

// Admin connection pool: bounded by the connection's maxConns, and idle
// connections are closed, so a quiet driver holds none.
const (
	poolIdleTime    = 30 * time.Second
	poolHealthCheck = 10 * time.Second
)

// NewAdmin checks cfg and returns an Admin that connects lazily. now is
// the clock (time.Now when nil).
func NewAdmin(cfg Config, now func() time.Time) (*Admin, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	if now == nil {
		now = time.Now
	}
	return &Admin{cfg: cfg, now: now, pools: map[string]*pgxpool.Pool{}}, nil
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

type target struct {
	connName, roleName string
	conn               *Connection
	role               *Role
}

func (t target) ref() string { return t.connName + "/" + t.roleName }

func (a *Admin) lookup(params map[string]string) (target, error) {
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
	t.conn = a.cfg.Connections[t.connName]
	if t.conn == nil {
		return t, fmt.Errorf("%w: no connection %q is configured", provider.ErrInvalidParameters, t.connName)
	}
	t.role = t.conn.Roles[t.roleName]
	if t.role == nil {
		return t, fmt.Errorf("%w: connection %q has no role %q", provider.ErrInvalidParameters, t.connName, t.roleName)
	}
	return t, nil
}

// verifierPattern is the form of a SCRAM-SHA-256 verifier: it goes into
// a statement between quotes, so nothing else is taken.
var verifierPattern = regexp.MustCompile(`^SCRAM-SHA-256\$[0-9]{1,7}:[A-Za-z0-9+/=]{1,200}\$[A-Za-z0-9+/=]{1,200}:[A-Za-z0-9+/=]{1,200}$`)

// Check applies the configuration's rules to r without touching the
// database: known connection and role, the pod's service account in the
// role's allowed list, a TTL within bounds, a well-formed verifier. It
// returns the TTL the role will have.
func (a *Admin) Check(node string, r MintRequest) (time.Duration, error) {
	t, err := a.lookup(r.Params)
	if err != nil {
		return 0, err
	}
	return a.check(t, node, r)
}

func (a *Admin) check(t target, node string, r MintRequest) (time.Duration, error) {
	if err := checkTagged(r.LeaseID, r.Class, node, r.Pod); err != nil {
		return 0, err
	}
	if !t.role.allows(r.Pod.Namespace, r.Pod.ServiceAccount) {
		return 0, fmt.Errorf("%w: service account %s/%s may not use role %q of connection %q",
			provider.ErrPermissionDenied, r.Pod.Namespace, r.Pod.ServiceAccount, t.roleName, t.connName)
	}
	if !verifierPattern.MatchString(r.Verifier) {
		return 0, fmt.Errorf("%w: verifier is not a SCRAM-SHA-256 verifier", provider.ErrInvalidParameters)
	}
	ttl := t.role.DefaultTTL.Duration
	if s := r.Params[TTLParam]; s != "" {
		var err error
		if ttl, err = time.ParseDuration(s); err != nil || ttl < 5*time.Second {
			return 0, fmt.Errorf("%w: ttl %q is not a duration of at least 5s", provider.ErrInvalidParameters, s)
		}
		if ttl > t.role.MaxTTL.Duration {
			return 0, fmt.Errorf("%w: ttl %s exceeds the role's maxTTL %s", provider.ErrInvalidParameters, ttl, t.role.MaxTTL.Duration)
		}
	}
	return ttl, nil
}

// Mint is MintFor with no node: the driver's own process asks.
func (a *Admin) Mint(ctx context.Context, r MintRequest) (Grant, error) { return a.MintFor(ctx, "", r) }

// MintFor creates the role of r.LeaseID from r.Verifier, valid for the
// TTL, tagged (with node, the asking node plugin's, empty in-process), in
// one transaction; with the role's maxLive set, it first counts the
// service account's live roles under a transaction-scoped advisory lock,
// so that replicas of the issuer agree.
func (a *Admin) MintFor(ctx context.Context, node string, r MintRequest) (Grant, error) {
	t, err := a.lookup(r.Params)
	if err != nil {
		return Grant{}, err
	}
	ttl, err := a.check(t, node, r)
	if err != nil {
		return Grant{}, err
	}
	name := RoleName(r.LeaseID)
	now := a.now().UTC().Truncate(time.Second)
	exp := now.Add(ttl)
	tag := Tag{LeaseID: r.LeaseID, Role: t.ref(), Class: r.Class, Pod: r.Pod, Node: node, Created: now}
	pool, err := a.pool(t.connName)
	if err != nil {
		return Grant{}, err
	}
	stmts, err := renderAll(t.role.creation, stmtData{Name: name, Password: r.Verifier}, exp)
	if err != nil {
		return Grant{}, scrub(err, r.Verifier)
	}
	ident := pgx.Identifier{name}.Sanitize()
	// The role always ends, whatever the admin's statements say, and
	// always carries its tag.
	stmts = append(stmts,
		fmt.Sprintf(`ALTER ROLE %s VALID UNTIL '%s'`, ident, pgTime(exp)),
		fmt.Sprintf(`COMMENT ON ROLE %s IS '%s'`, ident, tag))
	err = withRetry(ctx, "creating role", func(ctx context.Context) (bool, error) {
		unknown, err := inTx(ctx, pool, func(tx pgx.Tx) error {
			if t.role.MaxLive > 0 {
				if err := a.underQuota(ctx, tx, t, r.Pod); err != nil {
					return err
				}
			}
			for _, s := range stmts {
				if _, err := tx.Exec(ctx, s); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			err = scrub(err, r.Verifier)
		}
		return unknown, err
	})
	if err != nil {
		return Grant{}, err
	}
	return a.grant(t, name, now, exp), nil
}

func (a *Admin) grant(t target, name string, issued, exp time.Time) Grant {
	return Grant{
		Name: name, Role: t.ref(),
		Host: t.conn.Host, Port: t.conn.Port, Database: t.conn.Database,
		IssuedAt: issued, ExpiresAt: exp, NotAfter: issued.Add(t.role.MaxTTL.Duration),
	}
}

// underQuota refuses when the pod's service account already holds the
// role's maxLive live roles. The advisory lock, held until the
// transaction ends, makes concurrent mints for the same service account
// and role count one after the other.
func (a *Admin) underQuota(ctx context.Context, tx pgx.Tx, t target, pod provider.Pod) error {
	h := fnv.New64a()
	fmt.Fprintf(h, "ephemeral-secrets-csi maxLive %s %s/%s", t.ref(), pod.Namespace, pod.ServiceAccount)
	if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1)`, int64(h.Sum64())); err != nil {
		return err
	}
	roles, err := listTagged(ctx, tx)
	if err != nil {
		return err
	}
	now := a.now()
	live := 0
	for _, r := range roles {
		if r.Tag.Role == t.ref() && r.Tag.Pod.Namespace == pod.Namespace &&
			r.Tag.Pod.ServiceAccount == pod.ServiceAccount && r.ValidUntil.After(now) {
			live++
		}
	}
	if live >= t.role.MaxLive {
		return fmt.Errorf("%w: service account %s/%s holds %d live credentials of role %q, its maxLive",
			provider.ErrPermissionDenied, pod.Namespace, pod.ServiceAccount, live, t.ref())
	}
	return nil
}

// Extend moves the role's VALID UNTIL to now + TTL, at most the role's
// maxTTL after it was made (from its tag, not from the caller). It returns
// ErrNotRenewable when the role is gone or expired, or when the move
// would be too small to be worth it (the caller then swaps in a new
// role), and ErrPermissionDenied for a role that is not r's (untagged,
// another lease's, another pod's).
func (a *Admin) Extend(ctx context.Context, r ExtendRequest) (Grant, error) {
	t, err := a.lookup(r.Params)
	if err != nil {
		return Grant{}, err
	}
	ttl := t.role.DefaultTTL.Duration
	if s := r.Params[TTLParam]; s != "" {
		if d, err := time.ParseDuration(s); err == nil && d >= 5*time.Second && d <= t.role.MaxTTL.Duration {
			ttl = d
		}
	}
	name := r.Name
	if name == "" {
		name = RoleName(r.LeaseID)
	}
	pool, err := a.pool(t.connName)
	if err != nil {
		return Grant{}, err
	}
	var g Grant
	err = withRetry(ctx, "renewing role", func(ctx context.Context) (bool, error) {
		return inTx(ctx, pool, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1)`, roleLock(name)); err != nil {
				return err
			}
			cur, err := tagged(ctx, tx, name, r.LeaseID)
			if errors.Is(err, errNoRole) {
				return fmt.Errorf("%w: role %s no longer exists", provider.ErrNotRenewable, name)
			}
			if err != nil {
				return err
			}
			if cur.Tag.Role != t.ref() || !samePod(cur.Tag.Pod, r.Pod) {
				return fmt.Errorf("%w: role %s was made for another pod or role", provider.ErrPermissionDenied, name)
			}
			now := a.now().UTC().Truncate(time.Second)
			notAfter := cur.Tag.Created.Add(t.role.MaxTTL.Duration)
			exp := now.Add(ttl)
			if exp.After(notAfter) {
				exp = notAfter
			}
			if !cur.ValidUntil.After(now) {
				return fmt.Errorf("%w: role %s expired", provider.ErrNotRenewable, name)
			}
			// Worth it only if it moves the expiry the caller knows by a
			// tenth of the TTL (the caller rotates instead); the caller's
			// word decides nothing else: exp is now + TTL at most.
			known := r.ExpiresAt
			if known.IsZero() {
				known = cur.ValidUntil
			}
			if !exp.After(now) || exp.Sub(known) < ttl/10 {
				return fmt.Errorf("%w: role %s is near its maxTTL", provider.ErrNotRenewable, name)
			}
			stmts, err := renderAll(t.role.renew, stmtData{Name: name}, exp)
			if err != nil {
				return err
			}
			for _, s := range stmts {
				if _, err := tx.Exec(ctx, s); err != nil {
					return err
				}
			}
			g = a.grant(t, name, cur.Tag.Created, exp)
			return nil
		})
	})
	return g, err
}

// samePod reports whether the pod a role was made for is the one asking.
func samePod(made, asking provider.Pod) bool {
	return made.Namespace == asking.Namespace && made.Name == asking.Name && made.UID == asking.UID
}

// Drop ends the role of r: refuses its logins, ends its sessions, drops
// what it owns and drops it, with the revocation statements of the role
// it was made as (the defaults when the configuration no longer has it).
// A role that does not exist is dropped already; one without the tag of
// r's lease is refused (ErrPermissionDenied) and left alone. Params need
// only the connection.
func (a *Admin) Drop(ctx context.Context, r DropRequest) error {
	_, err := a.DropIf(ctx, r, nil)
	return err
}

// DropIf is Drop, done only if still (nil: always) holds for the role as
// it is under its lock, which Extend takes too: a reaper that decided on
// a listing does not drop a role extended since. dropped reports whether
// the statements ran.
func (a *Admin) DropIf(ctx context.Context, r DropRequest, still func(TaggedRole) bool) (dropped bool, err error) {
	connName := r.Params[ConnectionParam]
	conn := a.cfg.Connections[connName]
	if conn == nil {
		return false, fmt.Errorf("%w: no connection %q is configured", provider.ErrInvalidParameters, connName)
	}
	name := r.Name
	if name == "" {
		name = RoleName(r.LeaseID) // an issue interrupted before its answer was recorded
	}
	pool, err := a.pool(connName)
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
		cur, err := tagged(ctx, c, name, r.LeaseID)
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
		for _, s := range stmts {
			if _, err := c.Exec(ctx, s); err != nil {
				return false, err
			}
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
	// none (someone altered it: it counts as expired).
	ValidUntil time.Time
	// NotAfter is the latest the role may live: made + the role's maxTTL
	// (zero when the configuration no longer has the role).
	NotAfter time.Time
}

// Expired reports whether the role's time is over at now.
func (r TaggedRole) Expired(now time.Time) bool {
	return !r.ValidUntil.After(now) || (!r.NotAfter.IsZero() && !r.NotAfter.After(now))
}

// Tagged lists the roles of connection's server that the driver made
// through that connection (their tag names it).
func (a *Admin) Tagged(ctx context.Context, connection string) ([]TaggedRole, error) {
	conn := a.cfg.Connections[connection]
	if conn == nil {
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
			c, rname, _ := strings.Cut(r.Tag.Role, "/")
			if c != connection {
				continue
			}
			if role := conn.Roles[rname]; role != nil {
				r.NotAfter = r.Tag.Created.Add(role.MaxTTL.Duration)
			}
			out = append(out, r)
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
