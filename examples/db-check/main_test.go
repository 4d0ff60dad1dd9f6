package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/pgtest"
)

var server *pgtest.Server

func TestMain(m *testing.M) {
	os.Exit(func() int {
		s, err := pgtest.Start()
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer s.Close()
		server = s
		return m.Run()
	}())
}

// Passwords with the characters quoting must survive.
const (
	readerPassword = `pa'ss w\ord"1`
	otherPassword  = `second'pass`
)

func setup(t *testing.T) {
	t.Helper()
	err := server.Exec(context.Background(),
		`DROP TABLE IF EXISTS orders, customers`,
		`DROP ROLE IF EXISTS reader`, `DROP ROLE IF EXISTS reader2`,
		`CREATE TABLE orders (id int)`, `INSERT INTO orders VALUES (1), (2), (3)`,
		`CREATE TABLE customers (id int)`,
		`CREATE ROLE reader LOGIN PASSWORD 'pa''ss w\ord"1'`,
		`CREATE ROLE reader2 LOGIN PASSWORD 'second''pass'`,
		`GRANT SELECT ON orders TO reader, reader2`)
	if err != nil {
		t.Fatal(err)
	}
}

// pgEnv is examples/postgres's pg.env template, filled in.
func pgEnv(user, password string) string {
	return fmt.Sprintf("PGHOST=127.0.0.1\nPGPORT=%d\nPGDATABASE=postgres\nPGUSER=%s\nPGPASSWORD=%s\n", server.Port, user, password)
}

// quoted is how the driver's `format: env` quotes a value.
func quoted(v string) string { return "'" + strings.ReplaceAll(v, "'", `'\''`) + "'" }

// volume lays files out the way the driver does: name -> ..data/name,
// ..data -> a timestamped directory, swapped in one rename.
type volume struct {
	dir string
	n   int
}

func (v *volume) write(t *testing.T, name, content string) string {
	t.Helper()
	v.n++
	ts := filepath.Join(v.dir, fmt.Sprintf("..v%d", v.n))
	if err := os.Mkdir(ts, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(ts, name), []byte(content), 0o440); err != nil {
		t.Fatal(err)
	}
	tmp := filepath.Join(v.dir, "..data_tmp")
	if err := os.Symlink(filepath.Base(ts), tmp); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(v.dir, "..data")); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(v.dir, name)
	if _, err := os.Lstat(p); err != nil {
		if err := os.Symlink(filepath.Join("..data", name), p); err != nil {
			t.Fatal(err)
		}
	}
	return p
}

// syncBuffer is the output of a db-check running beside the test.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func checkNoSecret(t *testing.T, out string) {
	t.Helper()
	for _, p := range []string{readerPassword, otherPassword, "wrong-" + readerPassword} {
		if strings.Contains(out, p) {
			t.Errorf("the output shows a password:\n%s", out)
		}
	}
}

func TestChecks(t *testing.T) {
	setup(t)
	const orders, customers = "SELECT count(*) FROM orders", "SELECT count(*) FROM customers"
	json := fmt.Sprintf(`{"database": "postgres", "host": "127.0.0.1", "lease_id": "x", "password": %q, "port": "%d", "username": "reader"}`,
		readerPassword, server.Port)
	driverEnv := fmt.Sprintf("DATABASE='postgres'\nHOST='127.0.0.1'\nPASSWORD=%s\nPORT='%d'\nUSERNAME='reader'\n", quoted(readerPassword), server.Port)
	for _, tc := range []struct {
		name      string
		flag      string
		content   string
		allowed   string
		forbidden string
		want      int
		wantLine  string
	}{
		{"pg.env", "--env-file", pgEnv("reader", readerPassword), orders, customers, exitOK, "forbidden query refused: " + customers + ": SQLSTATE 42501"},
		{"format json", "--json-file", json, orders, customers, exitOK, "allowed query ok: " + orders + ": 1 row(s), first: 3"},
		{"format env", "--env-file", driverEnv, orders, customers, exitOK, "login ok: user=reader host=127.0.0.1"},
		{"wrong password", "--env-file", pgEnv("reader", "wrong-"+readerPassword), orders, customers, exitLogin, "login FAILED: user=reader"},
		{"allowed refused", "--env-file", pgEnv("reader", readerPassword), customers, customers, exitAllowed, "allowed query FAILED"},
		{"forbidden allowed", "--env-file", pgEnv("reader", readerPassword), orders, orders, exitForbidden, "forbidden query SUCCEEDED"},
		{"forbidden missing", "--env-file", pgEnv("reader", readerPassword), orders, "SELECT * FROM nothing", exitForbiddenOther, "not for lack of privilege"},
		{"no password", "--env-file", "PGHOST=127.0.0.1\nPGUSER=reader\n", orders, customers, exitUsage, "has no PGPASSWORD or PASSWORD or password"},
		{"not json", "--json-file", "PGHOST=x", orders, customers, exitUsage, "not a JSON object"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := filepath.Join(t.TempDir(), "cred")
			if err := os.WriteFile(f, []byte(tc.content), 0o400); err != nil {
				t.Fatal(err)
			}
			var out bytes.Buffer
			code := run(context.Background(), []string{tc.flag, f, "--allowed", tc.allowed, "--forbidden", tc.forbidden}, &out)
			if code != tc.want || !strings.Contains(out.String(), tc.wantLine) {
				t.Errorf("exit %d, want %d with %q; output:\n%s", code, tc.want, tc.wantLine, out.String())
			}
			checkNoSecret(t, out.String())
		})
	}
	var out bytes.Buffer
	if code := run(context.Background(), []string{"--allowed", orders}, &out); code != exitUsage {
		t.Errorf("no file: exit %d", code)
	}
}

// TestHoldFollowsRotation: with --hold, db-check logs in with the file's
// current credential after each in-place swap, and exits 3 once the
// credential stops working.
func TestHoldFollowsRotation(t *testing.T) {
	setup(t)
	v := &volume{dir: t.TempDir()}
	f := v.write(t, "pg.env", pgEnv("reader", readerPassword))
	out := &syncBuffer{}
	done := make(chan int, 1)
	go func() {
		done <- run(context.Background(), []string{"--env-file", f, "--allowed", "SELECT 1 FROM orders", "--forbidden", "SELECT 1 FROM customers", "--hold", "50ms"}, out)
	}()
	harness.Eventually(t, time.Minute, "db-check holds", func() (bool, error) {
		return strings.Contains(out.String(), "holding:"), nil
	})
	v.write(t, "pg.env", pgEnv("reader2", otherPassword))
	harness.Eventually(t, time.Minute, "db-check logs in as the rotated user", func() (bool, error) {
		return strings.Contains(out.String(), "login ok: user=reader2"), nil
	})
	// The old role revoked, the file still naming a dead credential.
	if err := server.Exec(context.Background(), `ALTER ROLE reader2 NOLOGIN`); err != nil {
		t.Fatal(err)
	}
	select {
	case code := <-done:
		if code != exitLogin || !strings.Contains(out.String(), "login FAILED: user=reader2") {
			t.Errorf("exit %d, want %d; output:\n%s", code, exitLogin, out.String())
		}
	case <-time.After(time.Minute):
		t.Fatalf("db-check did not exit on a failed login; output:\n%s", out.String())
	}
	checkNoSecret(t, out.String())
}

// TestSIGTERM runs the real binary: holding, it exits 0 on SIGTERM.
func TestSIGTERM(t *testing.T) {
	setup(t)
	dir := t.TempDir()
	bin := filepath.Join(dir, "db-check")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	f := filepath.Join(dir, "pg.env")
	if err := os.WriteFile(f, []byte(pgEnv("reader", readerPassword)), 0o400); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "--env-file", f, "--allowed", "SELECT 1 FROM orders", "--forbidden", "SELECT 1 FROM customers", "--hold", "1h")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var lines []string
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		lines = append(lines, sc.Text())
		if strings.Contains(sc.Text(), "holding:") {
			break
		}
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	for sc.Scan() {
		lines = append(lines, sc.Text())
	}
	err = cmd.Wait()
	if err != nil || !strings.Contains(lines[len(lines)-1], "terminated") {
		t.Errorf("after SIGTERM: %v; output:\n%s", err, strings.Join(lines, "\n"))
	}
	checkNoSecret(t, strings.Join(lines, "\n"))
}
