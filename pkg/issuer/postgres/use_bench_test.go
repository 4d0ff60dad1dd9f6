package postgres

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"golang.org/x/sync/errgroup"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/test/pgtest"
)

// BenchmarkSampleSessions is the cost of one look at the sessions of the
// issuer's roles (use observation, one query per connection per
// --use-interval) with 1,000 live tagged roles and 200 of their sessions
// open: the time per sample (p50, p99), and the CPU it takes per second
// at the default interval of 1 s, in the issuer (this process) and in
// PostgreSQL (the admin connection's backend).
func BenchmarkSampleSessions(b *testing.B) {
	const roles, sessions = 1000, 200
	ctx := context.Background()
	srv, err := pgtest.StartWith(pgtest.Options{MaxConnections: sessions + 20})
	if err != nil {
		b.Fatal(err)
	}
	defer srv.Close()
	// The sessions' password, set in the clear by the benchmark's own
	// statement (the verifier the engine is given is only checked).
	const password = "bench-password"
	cfg := Config{Connections: map[string]*Connection{"main": {URL: srv.AdminURL(), MaxConns: 8,
		Roles: map[string]*Role{"r": {CreationStatements: []string{`CREATE ROLE "{{.Name}}" LOGIN PASSWORD '` + password + `'`},
			Allowed: everyone}}}}}
	a, err := NewAdmin(cfg)
	if err != nil {
		b.Fatal(err)
	}
	defer a.Close()
	var g errgroup.Group
	g.SetLimit(8)
	created := time.Now().UTC().Truncate(time.Second)
	for i := range roles {
		g.Go(func() error {
			name := fmt.Sprintf("esc_bench_%04d", i)
			return a.Create(ctx, Creation{Connection: "main", Role: "r", Name: name, Verifier: verifier,
				ExpiresAt: created.Add(time.Hour), Tag: Tag{LeaseID: fmt.Sprintf("bench-%04d", i), Created: created,
					Pod: provider.Pod{Namespace: "bench", Name: fmt.Sprintf("pod-%04d", i), UID: "uid", ServiceAccount: "sa"}}})
		})
	}
	if err := g.Wait(); err != nil {
		b.Fatal(err)
	}
	conns := make([]*pgx.Conn, sessions)
	for i := range sessions {
		g.Go(func() (err error) {
			conns[i], err = pgx.Connect(ctx, srv.URL(fmt.Sprintf("esc_bench_%04d", i*roles/sessions), password))
			return err
		})
	}
	if err := g.Wait(); err != nil {
		b.Fatal(err)
	}
	defer func() {
		for _, c := range conns {
			_ = c.Close(ctx)
		}
	}()
	// An admin of one connection: the sample's backend is the one measured.
	one := Config{Connections: map[string]*Connection{"main": {URL: srv.AdminURL(), MaxConns: 1,
		Roles: map[string]*Role{"r": {CreationStatements: []string{create}, Allowed: everyone}}}}}
	if a, err = NewAdmin(one); err != nil {
		b.Fatal(err)
	}
	defer a.Close()
	s, err := a.SampleSessions(ctx, "main")
	if err != nil {
		b.Fatal(err)
	}
	open := 0
	for _, r := range s.Roles {
		open += len(r.Sessions)
	}
	if len(s.Roles) != roles || open != sessions || !s.Visible {
		b.Fatalf("a sample saw %d roles, %d sessions, visible %v", len(s.Roles), open, s.Visible)
	}
	backend, err := adminBackend(ctx, a)
	if err != nil {
		b.Fatal(err)
	}

	times := make([]time.Duration, 0, b.N)
	cpu0, srv0 := processCPU(), backendCPU(backend)
	for b.Loop() {
		start := time.Now()
		if _, err := a.SampleSessions(ctx, "main"); err != nil {
			b.Fatal(err)
		}
		times = append(times, time.Since(start))
	}
	cpu, srvCPU := processCPU()-cpu0, backendCPU(backend)-srv0
	if b.N > 0 && len(times) > 0 {
		slices.Sort(times)
		n := float64(len(times))
		b.ReportMetric(float64(times[len(times)/2].Microseconds())/1000, "p50-ms")
		b.ReportMetric(float64(times[min(len(times)-1, len(times)*99/100)].Microseconds())/1000, "p99-ms")
		// One sample a second: the CPU of one sample is the CPU per second.
		b.ReportMetric(float64(cpu.Microseconds())/1000/n, "issuer-cpu-ms/s")
		b.ReportMetric(float64(srvCPU.Microseconds())/1000/n, "postgres-cpu-ms/s")
	}
}

// adminBackend is the process ID of the admin pool's one connection.
func adminBackend(ctx context.Context, a *Admin) (int, error) {
	pool, err := a.pool("main")
	if err != nil {
		return 0, err
	}
	var pid int
	return pid, pool.QueryRow(ctx, `SELECT pg_backend_pid()`).Scan(&pid)
}

// processCPU is the CPU time (user and system) this process used so far.
func processCPU() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// backendCPU is the CPU time a PostgreSQL backend process used so far
// (utime and stime of /proc/<pid>/stat, in clock ticks of 10 ms).
func backendCPU(pid int) time.Duration {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	ut, _ := strconv.Atoi(f[11])
	st, _ := strconv.Atoi(f[12])
	return time.Duration(ut+st) * 10 * time.Millisecond
}
