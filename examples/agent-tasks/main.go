// Command agent-tasks is an AI agent's database work, as the lease socket
// lets it be done: each task asks its volume's socket for a credential of
// its own, uses it, and gives it back when done, so no credential outlives
// its task. It never prints a password.
//
//	agent-tasks --volume /run/secrets/db --tasks summarise,report \
//	    --query "SELECT count(*) FROM items" [--give-back]
//
// For each task it asks POST /v1/tasks, logs in with tasks/<task>/dsn and
// runs the query; both tasks hold their roles at once. Then it gives the
// first back (DELETE /v1/tasks/<task>, waiting for the backend), checks its
// login is refused and the second's still works, and gives the second
// back. With --give-back it then gives the volume's own credential back
// (POST /v1/lease/revoke) and checks that login is refused too.
//
//	agent-tasks call [--volume DIR] METHOD PATH [JSON]
//
// calls the socket once and prints the status and the answer (a curl for
// images without one).
//
// Exit codes: 0 every step behaved, 1 a step failed, 2 bad flags.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

func main() {
	os.Exit(run(context.Background(), os.Args[1:], os.Stdout))
}

func run(ctx context.Context, args []string, out io.Writer) int {
	if len(args) > 0 && args[0] == "call" {
		return call(ctx, args[1:], out)
	}
	fs := flag.NewFlagSet("agent-tasks", flag.ContinueOnError)
	fs.SetOutput(out)
	volume := fs.String("volume", "/run/secrets/db", "the volume's mount: lease.sock and the files")
	tasks := fs.String("tasks", "summarise,report", "two task IDs, comma-separated")
	query := fs.String("query", "SELECT count(*) FROM items", "a query each task's credential is granted")
	dsnFile := fs.String("dsn-file", "dsn", "the class's file holding a PostgreSQL URL")
	giveBack := fs.Bool("give-back", false, "at the end, give the volume's own credential back too")
	ttl := fs.String("ttl", "10m", "each task lease's life at most")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	ids := strings.Split(*tasks, ",")
	if len(ids) != 2 {
		fmt.Fprintln(out, "agent-tasks: --tasks takes two task IDs")
		return 2
	}
	a := &agent{out: out, sock: newClient(*volume), volume: *volume, query: *query, dsnFile: *dsnFile}
	if err := a.work(ctx, ids, *ttl, *giveBack); err != nil {
		a.say("FAILED: %v", err)
		return 1
	}
	a.say("done: every credential was given back and refused afterwards")
	return 0
}

type agent struct {
	out                    io.Writer
	sock                   *client
	volume, query, dsnFile string
}

func (a *agent) say(format string, args ...any) {
	fmt.Fprintf(a.out, "agent-tasks: "+format+"\n", args...)
}

func (a *agent) work(ctx context.Context, ids []string, ttl string, giveBack bool) error {
	var own struct {
		LeaseID string `json:"leaseID"`
		Role    string `json:"role"`
	}
	if err := a.sock.do(ctx, "GET", "/v1/lease", nil, http.StatusOK, &own); err != nil {
		return err
	}
	a.say("volume lease %s (role %s)", own.LeaseID, own.Role)
	dsns := map[string]string{}
	for _, id := range ids {
		var t struct {
			LeaseID string `json:"leaseID"`
			Role    string `json:"role"`
			Path    string `json:"path"`
		}
		if err := a.sock.do(ctx, "POST", "/v1/tasks", map[string]string{"task": id, "ttl": ttl}, http.StatusCreated, &t); err != nil {
			return fmt.Errorf("task %s: %w", id, err)
		}
		dsn, err := os.ReadFile(filepath.Join(a.volume, t.Path, a.dsnFile))
		if err != nil {
			return fmt.Errorf("task %s: %w", id, err)
		}
		dsns[id] = strings.TrimSpace(string(dsn))
		a.say("task %s: lease %s (role %s)", id, t.LeaseID, t.Role)
	}
	// Both tasks work at once, each with its own role.
	for _, id := range ids {
		n, user, err := a.use(ctx, dsns[id])
		if err != nil {
			return fmt.Errorf("task %s: %w", id, err)
		}
		a.say("task %s: %s as %s -> %d", id, a.query, user, n)
	}
	first, second := ids[0], ids[1]
	if err := a.giveBack(ctx, "/v1/tasks/"+first, "DELETE", "task "+first); err != nil {
		return err
	}
	if err := a.refused(ctx, dsns[first], "task "+first); err != nil {
		return err
	}
	if _, user, err := a.use(ctx, dsns[second]); err != nil {
		return fmt.Errorf("task %s stopped working when %s was given back: %w", second, first, err)
	} else {
		a.say("task %s: still works as %s", second, user)
	}
	if err := a.giveBack(ctx, "/v1/tasks/"+second, "DELETE", "task "+second); err != nil {
		return err
	}
	if err := a.refused(ctx, dsns[second], "task "+second); err != nil {
		return err
	}
	if !giveBack {
		return nil
	}
	dsn, err := os.ReadFile(filepath.Join(a.volume, a.dsnFile))
	if err != nil {
		return err
	}
	if err := a.giveBack(ctx, "/v1/lease/revoke", "POST", "the volume's credential"); err != nil {
		return err
	}
	if _, err := os.Stat(filepath.Join(a.volume, a.dsnFile)); !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("the volume's files are still there after the give-back (%v)", err)
	}
	return a.refused(ctx, strings.TrimSpace(string(dsn)), "the volume's credential")
}

// giveBack calls a revoking endpoint, waiting for the backend.
func (a *agent) giveBack(ctx context.Context, path, method, what string) error {
	var r struct {
		Confirmed bool   `json:"confirmed"`
		Status    string `json:"status"`
	}
	if err := a.sock.do(ctx, method, path, map[string]string{"wait": "10s"}, http.StatusOK, &r); err != nil {
		return fmt.Errorf("giving %s back: %w", what, err)
	}
	a.say("%s given back: %s", what, r.Status)
	return nil
}

// use logs in with dsn and runs the query.
func (a *agent) use(ctx context.Context, dsn string) (int64, string, error) {
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	conn, err := pgx.Connect(cctx, dsn)
	if err != nil {
		return 0, "", fmt.Errorf("login: %w", redact(err))
	}
	defer conn.Close(context.Background())
	var user string
	var n int64
	if err := conn.QueryRow(cctx, "SELECT current_user").Scan(&user); err != nil {
		return 0, "", err
	}
	if err := conn.QueryRow(cctx, a.query).Scan(&n); err != nil {
		return 0, user, fmt.Errorf("%s: %w", a.query, err)
	}
	return n, user, nil
}

// refused checks that dsn no longer logs in.
func (a *agent) refused(ctx context.Context, dsn, what string) error {
	if _, user, err := a.use(ctx, dsn); err == nil {
		return fmt.Errorf("%s still logs in as %s after it was given back", what, user)
	}
	a.say("%s: login refused, as it should be", what)
	return nil
}

// redact keeps a connection error's message free of the URL's password.
func redact(err error) error {
	msg := err.Error()
	if i := strings.Index(msg, "://"); i >= 0 {
		if j := strings.Index(msg[i:], "@"); j >= 0 {
			msg = msg[:i+3] + "..." + msg[i+j:]
		}
	}
	return errors.New(msg)
}

// client speaks HTTP over the volume's lease socket.
type client struct{ http *http.Client }

func newClient(volume string) *client {
	sock := filepath.Join(volume, "lease.sock")
	return &client{http: &http.Client{
		Timeout: 30 * time.Second,
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		}},
	}}
}

// do calls the socket and decodes the answer into into; a status other
// than want is an error with the socket's reason.
func (c *client) do(ctx context.Context, method, path string, body any, want int, into any) error {
	status, data, err := c.raw(ctx, method, path, body)
	if err != nil {
		return err
	}
	if status != want {
		return fmt.Errorf("%s %s: %d %s", method, path, status, strings.TrimSpace(string(data)))
	}
	return json.Unmarshal(data, into)
}

func (c *client) raw(ctx context.Context, method, path string, body any) (int, []byte, error) {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return 0, nil, err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://lease"+path, rd)
	if err != nil {
		return 0, nil, err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	return resp.StatusCode, data, err
}

// call is the "call" subcommand.
func call(ctx context.Context, args []string, out io.Writer) int {
	fs := flag.NewFlagSet("agent-tasks call", flag.ContinueOnError)
	fs.SetOutput(out)
	volume := fs.String("volume", "/run/secrets/db", "the volume's mount")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	rest := fs.Args()
	if len(rest) < 2 || len(rest) > 3 {
		fmt.Fprintln(out, "usage: agent-tasks call [--volume DIR] METHOD PATH [JSON]")
		return 2
	}
	var body any
	if len(rest) == 3 {
		body = json.RawMessage(rest[2])
	}
	status, data, err := newClient(*volume).raw(ctx, rest[0], rest[1], body)
	if err != nil {
		fmt.Fprintf(out, "error: %v\n", err)
		return 1
	}
	fmt.Fprintf(out, "%d %s\n", status, strings.TrimSpace(string(data)))
	return 0
}
