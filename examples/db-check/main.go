// Command db-check is the workload of the cluster tests, and an example of
// a pod using the credential the driver gives it: it reads the PostgreSQL
// credential from the volume, logs in, checks that a granted query works
// and a forbidden one is refused, and says so in one line per step, never
// printing the password.
//
//	db-check --env-file /run/secrets/db/pg.env \
//	    --allowed "SELECT count(*) FROM orders" --forbidden "SELECT count(*) FROM customers" [--hold 5s]
//
// Exit codes: 0 both queries behaved (or SIGTERM/SIGINT), 2 bad flags or an
// unreadable credential file, 3 the login failed, 4 the allowed query
// failed, 5 the forbidden query succeeded, 6 the forbidden query failed for
// another reason than insufficient_privilege (42501).
//
// With --hold D it keeps running after the checks: every D it reads the
// file again (the driver rotates it in place) and logs in with what it
// finds, printing the user; a failed login exits 3.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// Exit codes; a test reads them from the container's terminated state.
const (
	exitOK             = 0
	exitUsage          = 2
	exitLogin          = 3
	exitAllowed        = 4
	exitForbidden      = 5
	exitForbiddenOther = 6
)

// insufficientPrivilege is the SQLSTATE of a refused query.
const insufficientPrivilege = "42501"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	os.Exit(run(ctx, os.Args[1:], os.Stdout))
}

// checker runs the steps and prints their outcome.
type checker struct {
	out    io.Writer
	source source
}

func (c *checker) say(format string, args ...any) {
	fmt.Fprintf(c.out, "db-check: "+format+"\n", args...)
}

func run(ctx context.Context, args []string, out io.Writer) int {
	fs := flag.NewFlagSet("db-check", flag.ContinueOnError)
	fs.SetOutput(out)
	envFile := fs.String("env-file", "", "credential as PG* variables (PGHOST, PGPORT, PGDATABASE, PGUSER, PGPASSWORD), or the driver's `format: env`")
	jsonFile := fs.String("json-file", "", "credential as the driver's `format: json` (host, port, database, username, password)")
	allowed := fs.String("allowed", "", "a query the credential is granted: it must succeed")
	forbidden := fs.String("forbidden", "", "a query the credential is not granted: it must fail with 42501")
	hold := fs.Duration("hold", 0, "after the checks, log in again every this long with the file's current credential")
	if err := fs.Parse(args); err != nil {
		return exitUsage
	}
	c := &checker{out: out}
	switch {
	case (*envFile == "") == (*jsonFile == ""):
		c.say("give one of --env-file and --json-file")
		return exitUsage
	case *allowed == "" || *forbidden == "":
		c.say("give --allowed and --forbidden")
		return exitUsage
	case *hold < 0:
		c.say("--hold must not be negative")
		return exitUsage
	case *envFile != "":
		c.source = source{path: *envFile, parse: parseEnv}
	default:
		c.source = source{path: *jsonFile, parse: parseJSON}
	}

	conn, code := c.login(ctx)
	if conn == nil {
		return code
	}
	code = c.check(ctx, conn, *allowed, *forbidden)
	conn.Close(context.Background())
	if code != exitOK || *hold == 0 || ctx.Err() != nil {
		return code
	}

	c.say("holding: logging in again every %s with the current credential of %s", *hold, c.source.path)
	t := time.NewTicker(*hold)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			c.say("terminated: exiting")
			return exitOK
		case <-t.C:
		}
		conn, code := c.login(ctx)
		if conn == nil {
			return code
		}
		conn.Close(context.Background())
	}
}

// login reads the credential file and logs in with it. On failure the
// connection is nil and the code says why (exitOK when terminated).
func (c *checker) login(ctx context.Context) (*pgx.Conn, int) {
	cred, err := c.source.read()
	if err != nil {
		c.say("reading the credential: %v", err)
		return nil, exitUsage
	}
	conn, err := cred.connect(ctx)
	if err == nil {
		var user string
		if err = conn.QueryRow(ctx, "SELECT current_user").Scan(&user); err == nil {
			c.say("login ok: user=%s host=%s port=%s database=%s", user, cred.host, cred.port, cred.database)
			return conn, exitOK
		}
		conn.Close(context.Background())
	}
	if ctx.Err() != nil {
		c.say("terminated: exiting")
		return nil, exitOK
	}
	c.say("login FAILED: user=%s host=%s: %s", cred.user, cred.host, cred.scrub(err))
	return nil, exitLogin
}

// check runs the allowed query, then the forbidden one.
func (c *checker) check(ctx context.Context, conn *pgx.Conn, allowed, forbidden string) int {
	result, err := query(ctx, conn, allowed)
	switch {
	case ctx.Err() != nil:
		c.say("terminated: exiting")
		return exitOK
	case err != nil:
		c.say("allowed query FAILED: %s: %v", allowed, err)
		return exitAllowed
	}
	c.say("allowed query ok: %s: %s", allowed, result)

	_, err = query(ctx, conn, forbidden)
	var pgErr *pgconn.PgError
	switch {
	case ctx.Err() != nil:
		c.say("terminated: exiting")
		return exitOK
	case err == nil:
		c.say("forbidden query SUCCEEDED: %s", forbidden)
		return exitForbidden
	case errors.As(err, &pgErr) && pgErr.Code == insufficientPrivilege:
		c.say("forbidden query refused: %s: SQLSTATE %s", forbidden, pgErr.Code)
		return exitOK
	default:
		c.say("forbidden query failed, but not for lack of privilege: %s: %v", forbidden, err)
		return exitForbiddenOther
	}
}

// query runs q and formats its first row.
func query(ctx context.Context, conn *pgx.Conn, q string) (string, error) {
	rows, err := conn.Query(ctx, q)
	if err != nil {
		return "", err
	}
	defer rows.Close()
	var first []string
	n := 0
	for rows.Next() {
		if n == 0 {
			vals, err := rows.Values()
			if err != nil {
				return "", err
			}
			for _, v := range vals {
				first = append(first, fmt.Sprint(v))
			}
		}
		n++
	}
	if err := rows.Err(); err != nil {
		return "", err
	}
	if n == 0 {
		return "no rows", nil
	}
	return fmt.Sprintf("%d row(s), first: %s", n, strings.Join(first, " ")), nil
}
