package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"golang.org/x/sys/unix"

	"github.com/ephemeral-secrets/csi-driver/test/kubelet"
	"github.com/ephemeral-secrets/csi-driver/test/pgtest"
)

// giveBack is the lease socket's rows: from the answer of a give-back
// call to the credential's login being refused, and the call itself.
type giveBack struct {
	// Wait: the call waited for the backend's confirmation ("wait": "10s").
	WaitRefusedP50 float64 `json:"wait_answer_to_refused_p50_ms"`
	WaitRefusedP99 float64 `json:"wait_answer_to_refused_p99_ms"`
	WaitCallP50    float64 `json:"wait_call_p50_ms"`
	WaitCallP99    float64 `json:"wait_call_p99_ms"`
	// NoWait: the call answered once the revocation was queued.
	NoWaitRefusedP50 float64 `json:"nowait_answer_to_refused_p50_ms"`
	NoWaitRefusedP99 float64 `json:"nowait_answer_to_refused_p99_ms"`
	NoWaitCallP50    float64 `json:"nowait_call_p50_ms"`
	NoWaitCallP99    float64 `json:"nowait_call_p99_ms"`
	// Task: DELETE /v1/tasks/{task}, waiting.
	TaskRefusedP50 float64 `json:"task_answer_to_refused_p50_ms"`
	TaskRefusedP99 float64 `json:"task_answer_to_refused_p99_ms"`
	// Floor: one refused login (a role that does not exist), timed
	// alternately with the rows above: what "answer -> refused" cannot go
	// below when the first attempt is refused.
	FloorP50 float64 `json:"refused_login_floor_p50_ms"`
	FloorP99 float64 `json:"refused_login_floor_p99_ms"`
	// FirstAttempt counts the give-backs (of both kinds) whose first login
	// attempt after the answer was refused.
	FirstAttempt int `json:"refused_at_first_attempt"`
	Samples      int `json:"samples"`
}

// socketClient speaks HTTP to the lease socket of the volume mounted at
// target, through /proc/self/fd (the path is longer than a socket
// address may be); close releases the directory.
func socketClient(target string) (*http.Client, func(), error) {
	fd, err := unix.Open(target, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, nil, err
	}
	path := fmt.Sprintf("/proc/self/fd/%d/lease.sock", fd)
	c := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
	}}
	return c, func() { unix.Close(fd) }, nil
}

func post(c *http.Client, method, path, body string) error {
	req, err := http.NewRequest(method, "http://lease"+path, strings.NewReader(body))
	if err != nil {
		return err
	}
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	if resp.StatusCode >= 300 {
		return fmt.Errorf("%s %s: %d %s", method, path, resp.StatusCode, bytes.TrimSpace(data))
	}
	return nil
}

// untilRefused tries to log in with user and password until PostgreSQL
// refuses, and returns how long that took from start and the attempts.
func untilRefused(ctx context.Context, pg *pgtest.Server, user, password string, start time.Time) (time.Duration, int, error) {
	for n := 1; ; n++ {
		conn, err := pgx.Connect(ctx, pg.URL(user, password))
		if err != nil {
			var pgErr *pgconn.PgError
			if errors.As(err, &pgErr) && (pgErr.Code == "28P01" || pgErr.Code == "28000") { // bad password, or no such role
				return time.Since(start), n, nil
			}
			return 0, n, err
		}
		conn.Close(ctx)
		if time.Since(start) > 10*time.Second {
			return 0, n, fmt.Errorf("role %s still logs in 10 s after its give-back was answered", user)
		}
	}
}

// measureGiveBack publishes n volumes of a class with a lease socket and
// gives each credential back through it, half waiting for the backend's
// confirmation and half not; then a task lease per volume, given back.
func measureGiveBack(ctx context.Context, k *kubelet.Kubelet, pg *pgtest.Server, n int, r *results) error {
	reqs, err := requests(k, "gb", "pg-tasks", n)
	if err != nil {
		return err
	}
	var wait, noWait, waitCall, noWaitCall, task, floor []time.Duration
	for i, req := range reqs {
		if _, err := k.Node.NodePublishVolume(ctx, req); err != nil {
			return err
		}
		c, done, err := socketClient(req.TargetPath)
		if err != nil {
			return err
		}
		// A task first: its own role, given back.
		if err := post(c, "POST", "/v1/tasks", `{"task":"t"}`); err != nil {
			done()
			return err
		}
		user, password, err := credential(filepath.Join(req.TargetPath, "tasks", "t"))
		if err != nil {
			done()
			return err
		}
		if err := post(c, "DELETE", "/v1/tasks/t", `{"wait":"10s"}`); err != nil {
			done()
			return err
		}
		d, _, err := untilRefused(ctx, pg, user, password, time.Now())
		if err != nil {
			done()
			return err
		}
		task = append(task, d)
		if d, _, err = untilRefused(ctx, pg, "esc_bench_absent", "x", time.Now()); err != nil {
			done()
			return err
		}
		floor = append(floor, d)

		// Then the volume's own credential.
		user, password, err = credential(req.TargetPath)
		if err != nil {
			done()
			return err
		}
		body := `{"wait":"10s"}`
		if i%2 == 1 {
			body = ""
		}
		t := time.Now()
		err = post(c, "POST", "/v1/lease/revoke", body)
		answered := time.Now()
		done()
		if err != nil {
			return err
		}
		d, attempts, err := untilRefused(ctx, pg, user, password, answered)
		if err != nil {
			return err
		}
		if attempts == 1 {
			r.GiveBack.FirstAttempt++
		}
		if i%2 == 0 {
			wait, waitCall = append(wait, d), append(waitCall, answered.Sub(t))
		} else {
			noWait, noWaitCall = append(noWait, d), append(noWaitCall, answered.Sub(t))
		}
		if _, err := k.Node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: req.VolumeId, TargetPath: req.TargetPath}); err != nil {
			return err
		}
	}
	g := &r.GiveBack
	s := summarize(wait, 0, 0)
	g.WaitRefusedP50, g.WaitRefusedP99 = s.P50, s.P99
	s = summarize(waitCall, 0, 0)
	g.WaitCallP50, g.WaitCallP99 = s.P50, s.P99
	s = summarize(noWait, 0, 0)
	g.NoWaitRefusedP50, g.NoWaitRefusedP99 = s.P50, s.P99
	s = summarize(noWaitCall, 0, 0)
	g.NoWaitCallP50, g.NoWaitCallP99 = s.P50, s.P99
	s = summarize(task, 0, 0)
	g.TaskRefusedP50, g.TaskRefusedP99 = s.P50, s.P99
	s = summarize(floor, 0, 0)
	g.FloorP50, g.FloorP99 = s.P50, s.P99
	g.Samples = n
	return nil
}

// credential reads the username and password files of dir.
func credential(dir string) (string, string, error) {
	u, err := os.ReadFile(filepath.Join(dir, "username"))
	if err != nil {
		return "", "", err
	}
	p, err := os.ReadFile(filepath.Join(dir, "password"))
	if err != nil {
		return "", "", err
	}
	return strings.TrimSpace(string(u)), strings.TrimSpace(string(p)), nil
}
