// Package pgtest starts a throwaway PostgreSQL server on 127.0.0.1 from the
// distribution's binaries, for tests and the demo. It runs as the
// "postgres" system user (the server refuses root) in a temporary
// directory, and is stopped and removed by Close.
package pgtest

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/ephemeral-secrets/csi-driver/test/freeport"
)

// AdminPassword is the password of the throwaway server's superuser.
const AdminPassword = "throwaway-admin"

// Options widen where the server is reachable. The zero value is
// 127.0.0.1 only.
type Options struct {
	// Listen are more addresses to listen on (a test node's own).
	Listen []string
	// ClientNets are more networks (CIDR) that may log in with a password.
	ClientNets []string
	// MaxConnections is the server's max_connections (default 200).
	MaxConnections int
	// Durable keeps fsync on (a commit waits for its WAL on disk, as in
	// production); by default the tests' server does not sync.
	Durable bool
}

// Server is a running (or stopped) PostgreSQL.
type Server struct {
	Port    int
	opts    Options
	dir     string
	bin     string
	uid     int
	gid     int
	cmd     *exec.Cmd
	exited  chan struct{}
	LogFile string
}

// BinDir finds the PostgreSQL server binaries.
func BinDir() (string, error) {
	matches, _ := filepath.Glob("/usr/lib/postgresql/*/bin/postgres")
	sort.Slice(matches, func(i, j int) bool {
		vi, _ := strconv.Atoi(filepath.Base(filepath.Dir(filepath.Dir(matches[i]))))
		vj, _ := strconv.Atoi(filepath.Base(filepath.Dir(filepath.Dir(matches[j]))))
		return vi > vj
	})
	if len(matches) > 0 {
		return filepath.Dir(matches[0]), nil
	}
	if p, err := exec.LookPath("postgres"); err == nil {
		return filepath.Dir(p), nil
	}
	return "", errors.New("PostgreSQL server binaries not found (apt-get install postgresql)")
}

// Start initialises a cluster in a new temporary directory and starts it.
func Start() (*Server, error) { return StartWith(Options{}) }

// StartWith is Start, reachable as opts says.
func StartWith(opts Options) (*Server, error) {
	bin, err := BinDir()
	if err != nil {
		return nil, err
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		return nil, fmt.Errorf("no postgres system user (apt-get install postgresql): %w", err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	dir, err := os.MkdirTemp("", "esc-pg-")
	if err != nil {
		return nil, err
	}
	s := &Server{dir: dir, bin: bin, uid: uid, gid: gid, opts: opts, LogFile: filepath.Join(dir, "server.log")}
	if err := os.Chown(dir, uid, gid); err != nil {
		return nil, err
	}
	pwfile := filepath.Join(dir, "pw")
	if err := os.WriteFile(pwfile, []byte(AdminPassword+"\n"), 0o600); err != nil {
		return nil, err
	}
	if err := os.Chown(pwfile, uid, gid); err != nil {
		return nil, err
	}
	initdb := s.command(filepath.Join(bin, "initdb"), "-D", filepath.Join(dir, "data"), "-U", "postgres",
		"--pwfile", pwfile, "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync")
	if out, err := initdb.CombinedOutput(); err != nil {
		s.Close()
		return nil, fmt.Errorf("initdb: %v: %s", err, out)
	}
	if err := s.allowNets(); err != nil {
		s.Close()
		return nil, err
	}
	ports, err := freeport.Ports(1)
	if err != nil {
		s.Close()
		return nil, err
	}
	s.Port = ports[0]
	if err := s.Restart(); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

func (s *Server) command(name string, args ...string) *exec.Cmd {
	c := exec.Command(name, args...)
	c.Dir = s.dir
	c.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(s.uid), Gid: uint32(s.gid)}}
	return c
}

// Restart starts the server again (after Stop) on the same port and data.
func (s *Server) Restart() error {
	log, err := os.OpenFile(s.LogFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer log.Close()
	s.cmd = s.command(filepath.Join(s.bin, "postgres"), "-D", filepath.Join(s.dir, "data"),
		"-p", strconv.Itoa(s.Port), "-k", s.dir, "-c", "listen_addresses="+strings.Join(append([]string{"127.0.0.1"}, s.opts.Listen...), ","),
		"-c", "max_connections="+strconv.Itoa(cmp.Or(s.opts.MaxConnections, 200)))
	if !s.opts.Durable {
		s.cmd.Args = append(s.cmd.Args, "-c", "fsync=off", "-c", "full_page_writes=off")
	}
	s.cmd.Stdout, s.cmd.Stderr = log, log
	if err := s.cmd.Start(); err != nil {
		return err
	}
	s.exited = make(chan struct{})
	go func(c *exec.Cmd, done chan struct{}) { _ = c.Wait(); close(done) }(s.cmd, s.exited)
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		conn, err := pgx.Connect(ctx, s.AdminURL())
		cancel()
		if err == nil {
			_ = conn.Close(context.Background())
			return nil
		}
		select {
		case <-s.exited:
			out, _ := os.ReadFile(s.LogFile)
			return fmt.Errorf("postgres exited: %s", out)
		case <-time.After(100 * time.Millisecond):
		}
	}
	return errors.New("postgres did not become ready in 30s")
}

// allowNets lets ClientNets log in with a password.
func (s *Server) allowNets() error {
	if len(s.opts.ClientNets) == 0 {
		return nil
	}
	f, err := os.OpenFile(filepath.Join(s.dir, "data", "pg_hba.conf"), os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	for _, n := range s.opts.ClientNets {
		if _, err := fmt.Fprintf(f, "host all all %s scram-sha-256\n", n); err != nil {
			return err
		}
	}
	return nil
}

// Stop stops the server (fast shutdown: open sessions are ended).
func (s *Server) Stop() {
	if s.cmd == nil || s.cmd.Process == nil {
		return
	}
	_ = s.cmd.Process.Signal(syscall.SIGINT)
	select {
	case <-s.exited:
	case <-time.After(20 * time.Second):
		_ = s.cmd.Process.Kill()
		<-s.exited
	}
	s.cmd = nil
}

// Close stops the server and removes its files.
func (s *Server) Close() {
	s.Stop()
	_ = os.RemoveAll(s.dir)
}

// AdminURL is a superuser connection URL over TCP.
func (s *Server) AdminURL() string {
	return s.URL("postgres", AdminPassword)
}

// URL is a connection URL for user over TCP to the postgres database.
func (s *Server) URL(user, password string) string { return s.URLFor(user, password, "postgres") }

// URLFor is a connection URL for user over TCP to database.
func (s *Server) URLFor(user, password, database string) string {
	return fmt.Sprintf("postgres://%s:%s@127.0.0.1:%d/%s?sslmode=disable&connect_timeout=5", user, password, s.Port, database)
}

// Exec runs statements as the superuser.
func (s *Server) Exec(ctx context.Context, stmts ...string) error {
	return s.ExecIn(ctx, "postgres", stmts...)
}

// ExecIn runs statements as the superuser in database.
func (s *Server) ExecIn(ctx context.Context, database string, stmts ...string) error {
	conn, err := pgx.Connect(ctx, s.URLFor("postgres", AdminPassword, database))
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	for _, st := range stmts {
		if _, err := conn.Exec(ctx, st); err != nil {
			return fmt.Errorf("%s: %w", st, err)
		}
	}
	return nil
}

// RoleExists reports whether a role exists.
func (s *Server) RoleExists(ctx context.Context, name string) (bool, error) {
	conn, err := pgx.Connect(ctx, s.AdminURL())
	if err != nil {
		return false, err
	}
	defer conn.Close(ctx)
	var ok bool
	err = conn.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)`, name).Scan(&ok)
	return ok, err
}

// ValidUntil returns a role's VALID UNTIL.
func (s *Server) ValidUntil(ctx context.Context, name string) (time.Time, error) {
	conn, err := pgx.Connect(ctx, s.AdminURL())
	if err != nil {
		return time.Time{}, err
	}
	defer conn.Close(ctx)
	var t time.Time
	err = conn.QueryRow(ctx, `SELECT rolvaliduntil FROM pg_roles WHERE rolname = $1`, name).Scan(&t)
	return t, err
}

// CountRoles counts roles whose name starts with prefix.
func (s *Server) CountRoles(ctx context.Context, prefix string) (int, error) {
	conn, err := pgx.Connect(ctx, s.AdminURL())
	if err != nil {
		return 0, err
	}
	defer conn.Close(ctx)
	var n int
	err = conn.QueryRow(ctx, `SELECT count(*) FROM pg_roles WHERE starts_with(rolname, $1)`, prefix).Scan(&n)
	return n, err
}

// Main is the TestMain of a package whose tests share one server: it
// starts it into *s, runs the tests (m is the package's *testing.M),
// stops it and exits with their code.
func Main(m interface{ Run() int }, s **Server) {
	var err error
	if *s, err = Start(); err != nil {
		fmt.Println(err)
		os.Exit(1)
	}
	code := m.Run()
	(*s).Close()
	os.Exit(code)
}
