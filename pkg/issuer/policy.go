package issuer

import (
	"fmt"
	"strings"
	"time"

	pgengine "github.com/ephemeral-secrets/csi-driver/pkg/issuer/postgres"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider/postgres"
)

// The issuer's decisions over the postgres engine's roles, from the
// admin's configuration: which role a class names, who may use it, for
// how long, how many at once, how far an extension goes and when a role
// is over. The engine (pkg/issuer/postgres) applies none of them itself.

// minTTL is the shortest TTL a class may ask for.
const minTTL = 5 * time.Second

// target is the configured role a request names.
type target struct {
	connName, roleName string
	conn               *pgengine.Connection
	role               *pgengine.Role
}

func (t target) ref() string { return t.connName + "/" + t.roleName }

// lookup reads a class's parameters: only connection, role and ttl, the
// first two required and configured.
func (i *Issuer) lookup(params map[string]string) (target, error) {
	for k := range params {
		if k != postgres.ConnectionParam && k != postgres.RoleParam && k != postgres.TTLParam {
			return target{}, fmt.Errorf("%w: unknown parameter %q for provider postgres (it takes %s, %s, %s)",
				provider.ErrInvalidParameters, k, postgres.ConnectionParam, postgres.RoleParam, postgres.TTLParam)
		}
	}
	t := target{connName: params[postgres.ConnectionParam], roleName: params[postgres.RoleParam]}
	if t.connName == "" || t.roleName == "" {
		return t, fmt.Errorf("%w: parameters %q and %q are required", provider.ErrInvalidParameters, postgres.ConnectionParam, postgres.RoleParam)
	}
	var err error
	t.conn, t.role, err = i.admin.Lookup(t.connName, t.roleName)
	return t, err
}

// check applies the configuration's rules to a mint without touching the
// database: a request the engine can record (its tag), the pod's service
// account in the role's allowed list, a well-formed verifier, a TTL
// within bounds. It returns the TTL the role will have.
func check(t target, tag pgengine.Tag, r postgres.MintRequest) (time.Duration, error) {
	if err := tag.Check(); err != nil {
		return 0, err
	}
	if !allows(t.role, r.Pod.Namespace, r.Pod.ServiceAccount) {
		return 0, fmt.Errorf("%w: service account %s/%s may not use role %q of connection %q",
			provider.ErrPermissionDenied, r.Pod.Namespace, r.Pod.ServiceAccount, t.roleName, t.connName)
	}
	if err := pgengine.CheckVerifier(r.Verifier); err != nil {
		return 0, err
	}
	ttl := t.role.DefaultTTL.Duration
	if s := r.Params[postgres.TTLParam]; s != "" {
		var err error
		if ttl, err = time.ParseDuration(s); err != nil || ttl < minTTL {
			return 0, fmt.Errorf("%w: ttl %q is not a duration of at least 5s", provider.ErrInvalidParameters, s)
		}
		if ttl > t.role.MaxTTL.Duration {
			return 0, fmt.Errorf("%w: ttl %s exceeds the role's maxTTL %s", provider.ErrInvalidParameters, ttl, t.role.MaxTTL.Duration)
		}
	}
	return ttl, nil
}

// allows reports whether the service account sa of namespace ns is in
// the role's allowed list ("*" matches any name).
func allows(r *pgengine.Role, ns, sa string) bool {
	for _, s := range r.Allowed {
		if (s.Namespace == "*" || s.Namespace == ns) && (s.ServiceAccount == "*" || s.ServiceAccount == sa) {
			return true
		}
	}
	return false
}

// quota is the role's maxLive for pod's service account: the name of the
// engine's lock under which mints of the same service account and role
// are counted one after the other (by every replica), and the admission
// that refuses when the account already holds maxLive live roles. Nil
// admission: the role has no cap.
func (i *Issuer) quota(t target, pod provider.Pod) (string, func([]pgengine.TaggedRole) error) {
	if t.role.MaxLive <= 0 {
		return "", nil
	}
	return fmt.Sprintf("%s %s/%s", t.ref(), pod.Namespace, pod.ServiceAccount), func(roles []pgengine.TaggedRole) error {
		now := i.opts.Now()
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
}

// extension decides, under the role's lock, how far an extension of r
// moves the role's VALID UNTIL: to now + TTL, at most the role's maxTTL
// after it was made (from its tag, not from the caller). It refuses
// (ErrPermissionDenied) a role made for another pod or role, and says
// ErrNotRenewable when the role expired or when the move would be too
// small to be worth it (the caller then swaps in a new role).
func (i *Issuer) extension(t target, r postgres.ExtendRequest) func(pgengine.TaggedRole) (time.Time, error) {
	ttl := t.role.DefaultTTL.Duration
	if s := r.Params[postgres.TTLParam]; s != "" {
		if d, err := time.ParseDuration(s); err == nil && d >= minTTL && d <= t.role.MaxTTL.Duration {
			ttl = d
		}
	}
	return func(cur pgengine.TaggedRole) (time.Time, error) {
		if cur.Tag.Role != t.ref() || !samePod(cur.Tag.Pod, r.Pod) {
			return time.Time{}, fmt.Errorf("%w: role %s was made for another pod or role", provider.ErrPermissionDenied, cur.Name)
		}
		now := i.opts.Now().UTC().Truncate(time.Second)
		notAfter := cur.Tag.Created.Add(t.role.MaxTTL.Duration)
		exp := now.Add(ttl)
		if exp.After(notAfter) {
			exp = notAfter
		}
		if !cur.ValidUntil.After(now) {
			return time.Time{}, fmt.Errorf("%w: role %s expired", provider.ErrNotRenewable, cur.Name)
		}
		// Worth it only if it moves the expiry the caller knows by a
		// tenth of the TTL (the caller rotates instead); the caller's
		// word decides nothing else: exp is now + TTL at most.
		known := r.ExpiresAt
		if known.IsZero() {
			known = cur.ValidUntil
		}
		if !exp.After(now) || exp.Sub(known) < ttl/10 {
			return time.Time{}, fmt.Errorf("%w: role %s is near its maxTTL", provider.ErrNotRenewable, cur.Name)
		}
		return exp, nil
	}
}

// samePod reports whether the pod a role was made for is the one asking.
func samePod(made, asking provider.Pod) bool {
	return made.Namespace == asking.Namespace && made.Name == asking.Name && made.UID == asking.UID
}

// sameNode refuses a node plugin a role that another node asked for: a
// compromised node reaches only its own pods' roles. In-process and the
// kill switch (no node) reach every role.
func sameNode(c Caller, tr pgengine.TaggedRole) error {
	if c.Node != "" && tr.Tag.Node != c.Node {
		return fmt.Errorf("%w: role %s was issued to another node", provider.ErrPermissionDenied, tr.Name)
	}
	return nil
}

// notAfter is the latest a role of connection may live: made + its
// role's maxTTL; zero when the configuration no longer has the role.
func (i *Issuer) notAfter(connection string, r pgengine.TaggedRole) time.Time {
	conn, rname, _ := strings.Cut(r.Tag.Role, "/")
	if conn != connection {
		return time.Time{}
	}
	if _, role, err := i.admin.Lookup(conn, rname); err == nil {
		return r.Tag.Created.Add(role.MaxTTL.Duration)
	}
	return time.Time{}
}

// expired reports whether a role's time is over at now: its VALID UNTIL
// passed (or it has none: someone altered it), or its maxTTL did.
func expired(r pgengine.TaggedRole, notAfter, now time.Time) bool {
	return !r.ValidUntil.After(now) || (!notAfter.IsZero() && !notAfter.After(now))
}

// grant is what the node is told of a role: nothing secret.
func grant(t target, name string, issued, exp time.Time) postgres.Grant {
	return postgres.Grant{
		Name: name, Role: t.ref(),
		Host: t.conn.Host, Port: t.conn.Port, Database: t.conn.Database,
		IssuedAt: issued, ExpiresAt: exp, NotAfter: issued.Add(t.role.MaxTTL.Duration),
	}
}
