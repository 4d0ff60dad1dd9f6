package postgres

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// Sample is what one look at a server's sessions saw of the roles the
// driver made through a connection.
type Sample struct {
	// Visible is whether the admin may see other roles' sessions in full
	// (a superuser, or a member of pg_read_all_stats): without it
	// PostgreSQL hides their address, start and application, and a
	// session is only known to exist (Session.Hidden).
	Visible bool
	// Roles are every role the driver tagged for this connection, with
	// their sessions (none: not in use right now).
	Roles []SampledRole
}

// SampledRole is one tagged role and its open sessions.
type SampledRole struct {
	Name     string
	Tag      Tag
	Sessions []Session
}

// Session is one open session (a client backend) of a role.
type Session struct {
	PID int32
	// Addr is the client's IP address; empty for a session over a Unix
	// socket, or one the admin may not see.
	Addr string
	// Port is the client's port (-1: a Unix socket; 0: hidden).
	Port int32
	// Started is the backend's start; zero when hidden.
	Started time.Time
	// Application is the application_name the client set (the client's
	// own words: never trusted, never logged).
	Application string
}

// Hidden reports whether the admin may not see the session's details.
func (s Session) Hidden() bool { return s.Started.IsZero() }

// sampleSQL is one look at the server, in two parts. First whether the
// admin may see other roles' sessions, with every role the driver tagged
// (pg_shdescription, readable by any role; one row of NULLs with none);
// then every client backend of a tagged role, with the role's name and
// tag (pg_stat_activity shows a session it hides with its role and pid
// and nothing else, its backend_type too being hidden). The sessions are
// the outer side, each finding its tag by index: joined the other way,
// PostgreSQL rescans the sessions once per role (46 ms at 1,000 roles
// and 200 sessions, against a few here; BenchmarkSampleSessions).
const sampleSQL = `WITH can AS (
	SELECT r.rolsuper OR pg_has_role(r.oid, 'pg_read_all_stats', 'USAGE') AS see
	FROM pg_roles r WHERE r.rolname = current_user)
SELECT can.see, t.rolname, t.description, NULL::int, NULL::text, NULL::int, NULL::timestamptz, NULL::text
FROM can LEFT JOIN (
	SELECT r.rolname, d.description FROM pg_roles r
	JOIN pg_shdescription d ON d.objoid = r.oid AND d.classoid = 'pg_authid'::regclass
	WHERE starts_with(d.description, $1)) t ON true
UNION ALL
SELECT NULL, a.usename, d.description, a.pid, host(a.client_addr), a.client_port, a.backend_start, a.application_name
FROM pg_stat_activity a
JOIN pg_shdescription d ON d.objoid = a.usesysid AND d.classoid = 'pg_authid'::regclass
WHERE starts_with(d.description, $1) AND (a.backend_type = 'client backend' OR a.backend_type IS NULL)`

// SampleSessions looks once, in one query, at the sessions of the roles
// the driver made through connection. It does not retry: the caller
// looks again at its next interval.
func (a *Admin) SampleSessions(ctx context.Context, connection string) (Sample, error) {
	if a.cfg.Connections[connection] == nil {
		return Sample{}, fmt.Errorf("%w: no connection %q is configured", provider.ErrInvalidParameters, connection)
	}
	pool, err := a.pool(connection)
	if err != nil {
		return Sample{}, err
	}
	rows, err := pool.Query(ctx, sampleSQL, tagPrefix)
	if err != nil {
		return Sample{}, classify(err, "sampling sessions")
	}
	defer rows.Close()
	var out Sample
	byName := map[string]int{}
	prefix := connection + "/"
	for rows.Next() {
		var (
			see              pgtype.Bool
			name, desc, addr pgtype.Text
			app              pgtype.Text
			pid, port        pgtype.Int4
			started          pgtype.Timestamptz
		)
		if err := rows.Scan(&see, &name, &desc, &pid, &addr, &port, &started, &app); err != nil {
			return Sample{}, classify(err, "sampling sessions")
		}
		if see.Valid {
			out.Visible = see.Bool
		}
		if !name.Valid {
			continue // no tagged role, or a session's role dropped meanwhile
		}
		i, seen := byName[name.String]
		if !seen {
			tag, ok := parseTag(desc.String)
			if !ok || !strings.HasPrefix(tag.Role, prefix) {
				byName[name.String] = -1
				continue
			}
			i = len(out.Roles)
			byName[name.String] = i
			out.Roles = append(out.Roles, SampledRole{Name: name.String, Tag: tag})
		}
		if i < 0 || !pid.Valid {
			continue // another connection's role, or a role without sessions
		}
		s := Session{PID: pid.Int32, Addr: addr.String, Port: port.Int32, Application: app.String}
		if started.Valid {
			s.Started = started.Time
		}
		out.Roles[i].Sessions = append(out.Roles[i].Sessions, s)
	}
	if err := rows.Err(); err != nil {
		return Sample{}, classify(err, "sampling sessions")
	}
	return out, nil
}

// EndSessions fences role name of connection, made for leaseID, and
// ends its open sessions: it refuses the role's logins (committed at
// once, so no session starts after), takes membership of it (as the
// default revocation statements do: a CREATEROLE admin needs it to end
// another role's sessions) and terminates every session of it. It
// returns how many it ended. A role that is gone ends none; one without
// leaseID's tag is refused (ErrPermissionDenied) and left alone. Drop
// goes on from there.
func (a *Admin) EndSessions(ctx context.Context, connection, name, leaseID string) (int, error) {
	if a.cfg.Connections[connection] == nil {
		return 0, fmt.Errorf("%w: no connection %q is configured", provider.ErrInvalidParameters, connection)
	}
	pool, err := a.pool(connection)
	if err != nil {
		return 0, err
	}
	var ended int
	err = withRetry(ctx, "ending sessions", func(ctx context.Context) (bool, error) {
		c, err := pool.Acquire(ctx)
		if err != nil {
			return false, err
		}
		defer c.Release()
		if _, err := tagged(ctx, c, name, leaseID); errors.Is(err, errNoRole) {
			return false, nil
		} else if err != nil {
			return false, err
		}
		ident := pgx.Identifier{name}.Sanitize()
		if err := execAll(ctx, c, []string{
			fmt.Sprintf(`ALTER ROLE %s NOLOGIN`, ident),
			fmt.Sprintf(`GRANT %s TO CURRENT_USER`, ident),
		}); err != nil {
			return false, err
		}
		return false, c.QueryRow(ctx, `SELECT count(*) FILTER (WHERE pg_terminate_backend(a.pid))::int
			FROM pg_stat_activity a JOIN pg_roles r ON r.oid = a.usesysid
			WHERE r.rolname = $1 AND a.pid <> pg_backend_pid()`, name).Scan(&ended)
	})
	return ended, err
}
