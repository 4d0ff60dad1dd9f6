package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/jackc/pgx/v5"

	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/kubelet"
	"github.com/ephemeral-secrets/csi-driver/test/pgtest"
)

// backlog is the revocation backlog row: n PostgreSQL volumes unpublished
// with the backend reachable (no backlog), then n more unpublished while
// it is down (the queue grows by one with each), then the backend back.
type backlog struct {
	Volumes int `json:"volumes"`
	// Unpublish latencies, at concurrency 1, in the same run.
	NoBacklog latency `json:"unpublish_no_backlog"`
	Growing   latency `json:"unpublish_backlog_growing"`
	// CPUSeconds is the driver's CPU time (user + system) over the
	// unpublishes with the backend down: the queueing, and the workers'
	// failed attempts meanwhile.
	CPUSeconds float64 `json:"driver_cpu_seconds_while_queueing"`
	QueueingS  float64 `json:"queueing_wall_seconds"`
	// CPUNoBacklog is the same over the unpublishes with the backend up
	// (and its revocations, made meanwhile).
	CPUNoBacklog float64 `json:"driver_cpu_seconds_no_backlog"`
	NoBacklogS   float64 `json:"no_backlog_wall_seconds"`
	QueueDepth   int     `json:"queue_depth_when_backend_back"`
	// DrainS is from the backend back to the queue empty and every role
	// of the row gone.
	DrainS float64 `json:"backend_back_to_empty_seconds"`
	// PerSecond is Volumes / DrainS; PeakPerSecond the most revocations
	// the audit trail confirms within one second.
	PerSecond     float64 `json:"revocations_per_second"`
	PeakPerSecond int     `json:"peak_revocations_in_one_second"`
	// MaxInFlight is the most sessions of the driver's PostgreSQL
	// connection seen running a statement at once (sampled).
	MaxInFlight int `json:"max_revocations_in_flight"`
	// Load is the machine's 1-minute load average when the row began.
	Load float64 `json:"load_average_1m"`
}

func measureBacklog(ctx context.Context, k *kubelet.Kubelet, pg *pgtest.Server, drv *harness.Driver, auditLog string, n int, r *results) error {
	b := &r.Backlog
	b.Volumes, b.Load = n, loadAverage()
	admin, err := pgx.Connect(ctx, pg.AdminURL())
	if err != nil {
		return err
	}
	// Reconnected after the outage.
	defer func() { admin.Close(context.Background()) }()

	publishAll := func(prefix string) ([]*csi.NodePublishVolumeRequest, error) {
		reqs, err := requests(k, prefix, "pg", n)
		if err != nil {
			return nil, err
		}
		if _, _, fails := timeAll(reqs, 4, func(req *csi.NodePublishVolumeRequest) error {
			_, err := k.Node.NodePublishVolume(ctx, req)
			return err
		}); fails > 0 {
			return nil, fmt.Errorf("%d of %d publishes failed", fails, n)
		}
		return reqs, nil
	}
	drained := func(prefix string, timeout time.Duration) error {
		for end := time.Now().Add(timeout); ; time.Sleep(20 * time.Millisecond) {
			depth, err := queueDepth(drv)
			if err != nil {
				return err
			}
			roles, err := countRoles(ctx, admin, prefix)
			if err != nil {
				return err
			}
			if depth == 0 && roles == 0 {
				return nil
			}
			if time.Now().After(end) {
				return fmt.Errorf("after %s: %d revocations queued, %d roles of %s left", timeout, depth, roles, prefix)
			}
		}
	}

	// No backlog: the backend up, the queue emptied as it goes.
	reqs, err := publishAll("bl0")
	if err != nil {
		return err
	}
	cpu0, err := cpuSeconds(drv.Pid())
	if err != nil {
		return err
	}
	lat, el, fails := timeAll(reqs, 1, unpublisher(ctx, k))
	cpu1, err := cpuSeconds(drv.Pid())
	if err != nil {
		return err
	}
	b.NoBacklog, b.CPUNoBacklog, b.NoBacklogS = summarize(lat, el, fails), cpu1-cpu0, el.Seconds()
	if err := drained("bl0", 5*time.Minute); err != nil {
		return err
	}

	// The backlog: the backend down, every unpublish queues one more.
	if reqs, err = publishAll("bl1"); err != nil {
		return err
	}
	admin.Close(ctx)
	pg.Stop()
	if cpu0, err = cpuSeconds(drv.Pid()); err != nil {
		return err
	}
	lat, el, fails = timeAll(reqs, 1, unpublisher(ctx, k))
	if cpu1, err = cpuSeconds(drv.Pid()); err != nil {
		return err
	}
	b.Growing, b.CPUSeconds, b.QueueingS = summarize(lat, el, fails), cpu1-cpu0, el.Seconds()
	if b.QueueDepth, err = queueDepth(drv); err != nil {
		return err
	}

	// The backend back.
	if err := pg.Restart(); err != nil {
		return err
	}
	back := time.Now()
	if admin, err = pgx.Connect(ctx, pg.AdminURL()); err != nil {
		return err
	}
	sctx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() { b.MaxInFlight = sampleInFlight(sctx, pg) })
	err = drained("bl1", 10*time.Minute)
	b.DrainS = time.Since(back).Seconds()
	stop()
	wg.Wait()
	if err != nil {
		return err
	}
	b.PerSecond = float64(n) / b.DrainS
	b.PeakPerSecond, err = peakRevocations(auditLog, back)
	return err
}

// queueDepth reads the driver's revocation queue gauge.
func queueDepth(drv *harness.Driver) (int, error) {
	resp, err := http.Get("http://" + drv.MetricsAddr + "/metrics")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, err
	}
	for line := range strings.Lines(string(body)) {
		if v, ok := strings.CutPrefix(line, "ephemeral_secrets_revocation_queue_depth "); ok {
			f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			return int(f), err
		}
	}
	return 0, fmt.Errorf("no revocation_queue_depth in /metrics")
}

func countRoles(ctx context.Context, admin *pgx.Conn, prefix string) (int, error) {
	var n int
	err := admin.QueryRow(ctx, `SELECT count(*) FROM pg_roles WHERE rolname LIKE $1`, "esc_bench_"+prefix+"_%").Scan(&n)
	return n, err
}

// sampleInFlight counts, as often as it can until ctx is done, the other
// client sessions running a statement, and returns the most seen at once.
func sampleInFlight(ctx context.Context, pg *pgtest.Server) int {
	conn, err := pgx.Connect(ctx, pg.AdminURL())
	if err != nil {
		return -1
	}
	defer conn.Close(context.Background())
	most := 0
	for ctx.Err() == nil {
		var n int
		if err := conn.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity
			WHERE backend_type = 'client backend' AND state = 'active' AND pid <> pg_backend_pid()`).Scan(&n); err != nil {
			break
		}
		most = max(most, n)
	}
	return most
}

// peakRevocations is the most revocations the audit trail records as
// confirmed within one second since from.
func peakRevocations(path string, from time.Time) (int, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	perSecond := map[int64]int{}
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var rec struct {
			Time    time.Time `json:"time"`
			Stage   string    `json:"stage"`
			Outcome string    `json:"outcome"`
		}
		if json.Unmarshal(sc.Bytes(), &rec) != nil || rec.Stage != "revoke" || rec.Outcome != "success" || rec.Time.Before(from) {
			continue
		}
		perSecond[rec.Time.Unix()]++
	}
	peak := 0
	for _, c := range perSecond {
		peak = max(peak, c)
	}
	return peak, sc.Err()
}

// cpuSeconds is a process's user and system CPU time.
func cpuSeconds(pid int) (float64, error) {
	data, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return 0, err
	}
	// Fields after the command's closing parenthesis: utime is the 12th,
	// stime the 13th (fields 14 and 15 of proc(5)).
	rest := string(data[strings.LastIndexByte(string(data), ')')+2:])
	f := strings.Fields(rest)
	if len(f) < 13 {
		return 0, fmt.Errorf("short /proc/%d/stat", pid)
	}
	ut, err1 := strconv.ParseFloat(f[11], 64)
	st, err2 := strconv.ParseFloat(f[12], 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("parsing /proc/%d/stat", pid)
	}
	const ticks = 100 // USER_HZ on Linux
	return (ut + st) / ticks, nil
}

// loadAverage is the 1-minute load average (0 if unreadable).
func loadAverage() float64 {
	data, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return 0
	}
	v, _ := strconv.ParseFloat(strings.Fields(string(data))[0], 64)
	return v
}
