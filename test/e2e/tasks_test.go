package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/kubelet"
)

// taskClasses are classes with a lease socket.
const taskClasses = `
---
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: agent-db
  namespace: team-a
spec:
  provider: postgres
  parameters:
    connection: main
    role: reader
    leaseAPI: "true"
    maxTasks: "2"
    files: |
      - path: username
        value: username
      - path: password
        value: password
      - path: dsn
        template: "postgres://{{ .username }}:{{ .password }}@{{ .host }}:{{ .port }}/{{ .database }}?sslmode=disable"
`

var (
	agentOnce sync.Once
	agentBin  string
	agentErr  error
)

// agentTasks builds examples/agent-tasks once.
func agentTasks(t *testing.T) string {
	t.Helper()
	agentOnce.Do(func() {
		dir, err := os.MkdirTemp("", "esc-agent-")
		if err == nil {
			err = os.Chmod(dir, 0o755) // run as uid 1000 too
		}
		if err != nil {
			agentErr = err
			return
		}
		agentBin, agentErr = harness.BuildPackage(dir, "./examples/agent-tasks")
	})
	if agentErr != nil {
		t.Fatal(agentErr)
	}
	return agentBin
}

func setupTasks(t *testing.T, extra ...string) *fixture {
	t.Helper()
	return startFixture(t, classes+taskClasses, backends("1h", "2h"), extra...)
}

// publishAgent publishes the agent-db volume of a new pod and returns the
// pod and its target, its password remembered as a secret.
func publishAgent(t *testing.T, f *fixture, name string) (kubelet.Pod, string) {
	t.Helper()
	pod := newPod(name, "app")
	target, err := f.kube.Publish(context.Background(), pod, dbVolume("agent-db"))
	if err != nil {
		t.Fatalf("publish %s: %v", name, err)
	}
	harness.RememberSecret(readSecret(t, target, "password"))
	return pod, target
}

// sock is a client of one volume's lease socket, dialled as the pod
// would: through the pod's view of the mount. The directory is held open
// and the socket dialled through /proc/self/fd (the test's paths are
// longer than a socket address may be).
type sock struct {
	dir  *os.File
	http *http.Client
}

func dialSocket(t *testing.T, mount string) *sock {
	t.Helper()
	dir, err := os.OpenFile(mount, unix.O_PATH|unix.O_DIRECTORY, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dir.Close() })
	path := fmt.Sprintf("/proc/self/fd/%d/lease.sock", dir.Fd())
	return &sock{dir: dir, http: &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
	}}}
}

// call makes one request and returns the status and the decoded answer.
func (s *sock) call(t *testing.T, method, path, body string) (int, map[string]any) {
	t.Helper()
	code, raw := s.raw(t, method, path, body)
	var out map[string]any
	if err := json.Unmarshal(raw, &out); err != nil {
		t.Fatalf("%s %s: answer %q is not JSON: %v", method, path, raw, err)
	}
	return code, out
}

func (s *sock) raw(t *testing.T, method, path, body string) (int, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, "http://lease"+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := s.http.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, raw
}

// asPodUser runs the agent-tasks binary as uid 1000 in group gid, with the
// pod's view of mount as /proc/self/fd/3: what a non-root container sees.
func asPodUser(t *testing.T, mount string, gid uint32, args ...string) (string, error) {
	t.Helper()
	dir, err := os.OpenFile(mount, unix.O_PATH|unix.O_DIRECTORY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer dir.Close()
	cmd := exec.Command(agentTasks(t), args...)
	cmd.ExtraFiles = []*os.File{dir}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 1000, Gid: gid}}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err = cmd.Run()
	return out.String(), err
}

// auditOf returns the audit records of the fixture as maps.
func auditOf(t *testing.T, f *fixture) []map[string]any {
	t.Helper()
	data, err := os.ReadFile(f.audit)
	if err != nil {
		t.Fatal(err)
	}
	var out []map[string]any
	for _, line := range strings.Split(strings.TrimSpace(string(data)), "\n") {
		var r map[string]any
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			t.Fatal(err)
		}
		out = append(out, r)
	}
	return out
}

// A non-root container in the fsGroup runs two tasks, each with its own
// role at the same time, gives each back (the other keeps working), then
// gives the volume's own credential back: every login is refused after,
// the volume stays mounted and empty, a republish issues nothing, and the
// audit trail shows each task from issue to revoke.
func TestLeaseSocketTasksAndGiveBack(t *testing.T) {
	ctx := context.Background()
	f := setupTasks(t)
	pod, target := publishAgent(t, f, "agent-t1")
	view := f.env.InPodView(target)

	// The socket: root:fsGroup 0660, at the volume's root, seen through the
	// pod's read-only mount.
	st, err := os.Lstat(filepath.Join(view, "lease.sock"))
	if err != nil {
		t.Fatal(err)
	}
	sys := st.Sys().(*syscall.Stat_t)
	if st.Mode()&os.ModeSocket == 0 || st.Mode().Perm() != 0o660 || sys.Uid != 0 || sys.Gid != 1234 {
		t.Errorf("lease.sock: mode %v owner %d:%d, want a socket 0660 0:1234", st.Mode(), sys.Uid, sys.Gid)
	}
	if opts, _, _, ok := harness.MountOptions(view); !ok || !slices.Contains(opts, "ro") {
		t.Fatalf("the pod's view is not a read-only mount: %v", opts)
	}

	out, err := asPodUser(t, view, 1234, "--volume", "/proc/self/fd/3", "--tasks", "summarise,report",
		"--query", "SELECT count(*) FROM public.items", "--give-back")
	t.Logf("agent-tasks:\n%s", out)
	if err != nil {
		t.Fatalf("agent-tasks as uid 1000 in the fsGroup: %v", err)
	}
	for _, want := range []string{"task summarise: lease", "task report: still works", "task summarise: login refused",
		"task report: login refused", "the volume's credential: login refused", "done:"} {
		if !strings.Contains(out, want) {
			t.Errorf("agent output lacks %q", want)
		}
	}
	if n, _ := pg.CountRoles(ctx, "esc_team_a_agent_t1_"); n != 0 {
		t.Errorf("%d roles of the pod left after every give-back", n)
	}

	// Withdrawn: mounted, empty but for the socket, which says so.
	entries, _ := os.ReadDir(view)
	if len(entries) != 1 || entries[0].Name() != "lease.sock" {
		t.Errorf("withdrawn volume shows %d entries", len(entries))
	}
	s := dialSocket(t, view)
	code, info := s.call(t, "GET", "/v1/lease", "")
	if code != http.StatusOK || info["state"] != "withdrawn" || info["withdrawn"] != "given back" {
		t.Errorf("GET /v1/lease after the give-back: %d %v", code, info)
	}
	if code, _ := s.call(t, "POST", "/v1/tasks", `{"task":"late"}`); code != http.StatusGone {
		t.Errorf("a task after the give-back: %d, want 410", code)
	}
	if _, err := f.kube.Publish(ctx, pod, dbVolume("agent-db")); err != nil {
		t.Fatalf("republish of the withdrawn volume: %v", err)
	}
	if n, _ := pg.CountRoles(ctx, "esc_team_a_agent_t1_"); n != 0 {
		t.Errorf("the republish issued %d roles", n)
	}

	// The trail: each task from issue to revoke, every call with the pod.
	tasks := map[string][]string{}
	calls := 0
	for _, r := range auditOf(t, f) {
		task, _ := r["task"].(string)
		if r["stage"] == "api" {
			calls++
			if pod, _ := r["pod"].(map[string]any); pod["name"] != "agent-t1" || r["lease_id"] == nil {
				t.Errorf("api record without the pod or lease: %v", r)
			}
		}
		if task != "" && r["stage"] != "api" {
			tasks[task] = append(tasks[task], fmt.Sprint(r["stage"], "/", r["outcome"]))
		}
	}
	for _, task := range []string{"summarise", "report"} {
		if got := strings.Join(tasks[task], " "); got != "issue/success revoke/pending revoke/success" {
			t.Errorf("audit of task %s: %q, want issue, revoke pending, revoke success", task, got)
		}
	}
	if calls < 6 {
		t.Errorf("%d socket calls audited, want every one (at least 6)", calls)
	}

	if err := f.kube.Unpublish(ctx, pod, "db"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(filepath.Join(f.env.StateDir, "volumes")); err != nil {
		t.Fatal(err)
	}
}

// Past the task cap and the rate limit: 429 with a reason, no role made,
// audited and counted; bad bodies are 400 or 413.
func TestLeaseSocketLimits(t *testing.T) {
	ctx := context.Background()
	f := setupTasks(t, "--lease-api-rate", "0.01", "--lease-api-burst", "10")
	pod, target := publishAgent(t, f, "agent-t2")
	s := dialSocket(t, f.env.InPodView(target))
	for _, task := range []string{"a", "b"} {
		if code, body := s.call(t, "POST", "/v1/tasks", `{"task":"`+task+`"}`); code != http.StatusCreated {
			t.Fatalf("task %s: %d %v", task, code, body)
		}
		harness.RememberSecret(readSecret(t, target, "tasks/"+task+"/password"))
	}
	before, _ := pg.CountRoles(ctx, "esc_team_a_agent_t2_")
	code, body := s.call(t, "POST", "/v1/tasks", `{"task":"c"}`)
	if code != http.StatusTooManyRequests || !strings.Contains(fmt.Sprint(body["error"]), "task leases") {
		t.Errorf("a third task: %d %v, want 429 saying why", code, body)
	}
	if code, _ := s.call(t, "POST", "/v1/tasks", `{"task":"a"}`); code != http.StatusConflict {
		t.Errorf("a task twice: %d, want 409", code)
	}
	for _, bad := range []string{`{"task":"Bad_ID"}`, `{"task":""}`, `{"task":"x","extra":1}`, `not json`, `{"task":"x","ttl":"soon"}`} {
		if code, body := s.call(t, "POST", "/v1/tasks", bad); code != http.StatusBadRequest {
			t.Errorf("body %s: %d %v, want 400", bad, code, body)
		}
	}
	if code, _ := s.raw(t, "POST", "/v1/tasks", `{"task":"`+strings.Repeat("x", 5000)+`"}`); code != http.StatusRequestEntityTooLarge {
		t.Errorf("a 5 kB body: %d, want 413", code)
	}
	// The burst is spent by now: the rate limit answers.
	code, body = s.call(t, "POST", "/v1/tasks", `{"task":"d"}`)
	if code != http.StatusTooManyRequests || !strings.Contains(fmt.Sprint(body["error"]), "rate limit") {
		t.Errorf("past the rate: %d %v, want 429 rate limit", code, body)
	}
	if after, _ := pg.CountRoles(ctx, "esc_team_a_agent_t2_"); after != before {
		t.Errorf("refused calls made roles: %d before, %d after", before, after)
	}

	refused := 0
	for _, r := range auditOf(t, f) {
		if r["stage"] == "api" && r["outcome"] == "refused" {
			refused++
		}
	}
	if refused != 8 {
		t.Errorf("%d refusals audited, want 8", refused)
	}
	_, metrics, err := f.driver.Scrape("/metrics")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(metrics, `ephemeral_secrets_lease_api_requests_total{code="429",endpoint="POST /v1/tasks",namespace="team-a"} 2`) {
		t.Errorf("metrics lack the two 429s:\n%s", grepLines(metrics, "lease_api"))
	}
	if err := f.kube.Unpublish(ctx, pod, "db"); err != nil {
		t.Fatal(err)
	}
	harness.Eventually(t, 10*time.Second, "every role of the pod dropped", func() (bool, error) {
		n, err := pg.CountRoles(ctx, "esc_team_a_agent_t2_")
		return n == 0, err
	})
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// Only the pod reaches its socket: not a user outside its fsGroup, not a
// process that is not in the pod's mount (the state directory is root's),
// and each socket speaks for its own volume only. No answer holds a
// secret.
func TestLeaseSocketOnlyThroughThePod(t *testing.T) {
	ctx := context.Background()
	f := setupTasks(t)
	a, ta := publishAgent(t, f, "agent-t3")
	b, tb := publishAgent(t, f, "agent-t4")
	secrets := []string{readSecret(t, ta, "password"), readSecret(t, tb, "password")}

	// Another group: the socket refuses the connection.
	out, err := asPodUser(t, f.env.InPodView(ta), 999, "call", "--volume", "/proc/self/fd/3", "GET", "/v1/lease")
	if err == nil || !strings.Contains(out, "permission denied") {
		t.Errorf("uid 1000 outside the fsGroup reached the socket: %v\n%s", err, out)
	}
	// The state directory, where the sockets live, is root's alone.
	st, err := os.Stat(f.env.StateDir)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o700 {
		t.Errorf("state directory mode %o, want 0700", st.Mode().Perm())
	}
	// A process of the fsGroup outside the pod, dialling the socket where
	// the driver keeps it, is stopped at the state directory.
	socks, _ := filepath.Glob(filepath.Join(f.env.StateDir, "volumes", "*", "fs", "lease.sock"))
	if len(socks) != 2 {
		t.Fatalf("%d sockets in the state directory, want 2", len(socks))
	}
	rel, _ := filepath.Rel(f.env.StateDir, filepath.Dir(socks[0]))
	out, err = asPodUser(t, f.env.StateDir, 1234, "call", "--volume", "/proc/self/fd/3/"+rel, "GET", "/v1/lease")
	if err == nil || !strings.Contains(out, "permission denied") {
		t.Errorf("a process of the fsGroup outside the pod reached a socket in the state directory: %v\n%s", err, out)
	}

	// Each socket answers for its own volume.
	sa, sb := dialSocket(t, f.env.InPodView(ta)), dialSocket(t, f.env.InPodView(tb))
	_, ia := sa.call(t, "GET", "/v1/lease", "")
	_, ib := sb.call(t, "GET", "/v1/lease", "")
	if !strings.Contains(fmt.Sprint(ia["leaseID"]), "agent-t3") || !strings.Contains(fmt.Sprint(ib["leaseID"]), "agent-t4") {
		t.Errorf("sockets answer for the wrong volume: %v / %v", ia["leaseID"], ib["leaseID"])
	}
	var answers [][]byte
	for _, c := range []struct{ method, path, body string }{
		{"GET", "/v1/lease", ""}, {"POST", "/v1/tasks", `{"task":"t"}`}, {"GET", "/v1/tasks", ""},
		{"POST", "/v1/lease/rotate", ""}, {"GET", "/v1/lease", ""}, {"DELETE", "/v1/tasks/t", `{"wait":"5s"}`},
	} {
		code, raw := sa.raw(t, c.method, c.path, c.body)
		if code >= 300 {
			t.Errorf("%s %s: %d %s", c.method, c.path, code, raw)
		}
		answers = append(answers, raw)
		if c.path == "/v1/tasks" && c.method == "POST" {
			secrets = append(secrets, readSecret(t, ta, "tasks/t/password"))
		}
		if c.path == "/v1/lease/rotate" {
			secrets = append(secrets, readSecret(t, ta, "password"))
		}
	}
	for _, raw := range answers {
		for _, s := range secrets {
			if bytes.Contains(raw, []byte(s)) {
				t.Errorf("a socket answer holds a secret: %s", raw)
			}
		}
	}
	for _, p := range []kubelet.Pod{a, b} {
		if err := f.kube.Unpublish(ctx, p, "db"); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := os.Lstat(filepath.Join(ta, "lease.sock")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket left after unpublish: %v", err)
	}
}

// A driver restart keeps the socket and the task leases: the socket
// answers again, the task's credential still works and its DELETE
// revokes it.
func TestLeaseSocketSurvivesARestart(t *testing.T) {
	ctx := context.Background()
	f := setupTasks(t)
	pod, target := publishAgent(t, f, "agent-t5")
	s := dialSocket(t, f.env.InPodView(target))
	if code, body := s.call(t, "POST", "/v1/tasks", `{"task":"long-task"}`); code != http.StatusCreated {
		t.Fatalf("task: %d %v", code, body)
	}
	user := readFile(t, target, "tasks/long-task/username")
	password := readSecret(t, target, "tasks/long-task/password")

	f.driver.Kill()
	if err := f.driver.Start(ctx); err != nil {
		t.Fatal(err)
	}
	code, body := s.call(t, "GET", "/v1/tasks", "")
	if code != http.StatusOK || !strings.Contains(fmt.Sprint(body["tasks"]), "long-task") {
		t.Fatalf("after a restart, GET /v1/tasks: %d %v", code, body)
	}
	if conn, err := login(ctx, user, password); err != nil {
		t.Fatalf("the task's credential died with the restart: %v", err)
	} else {
		conn.Close(ctx)
	}
	if code, body := s.call(t, "DELETE", "/v1/tasks/long-task", `{"wait":"10s"}`); code != http.StatusOK || body["confirmed"] != true {
		t.Fatalf("DELETE after a restart: %d %v", code, body)
	}
	if refused, err := loginRefused(ctx, user, password); !refused {
		t.Errorf("the task's credential still logs in after DELETE (%v)", err)
	}
	if err := f.kube.Unpublish(ctx, pod, "db"); err != nil {
		t.Fatal(err)
	}
}

// A pod calling its socket in a loop: every call counted, the refusals'
// audit records bounded (the ones held back are counted in the next), and
// the driver still answers another volume's pod.
func TestLeaseSocketFloodIsCountedNotLogged(t *testing.T) {
	ctx := context.Background()
	f := setupTasks(t, "--lease-api-rate", "0.01", "--lease-api-burst", "1")
	a, ta := publishAgent(t, f, "agent-t6")
	b, tb := publishAgent(t, f, "agent-t7")
	s := dialSocket(t, f.env.InPodView(ta))
	const calls = 200
	var wg sync.WaitGroup
	codes := make(chan int, calls)
	for range 16 {
		wg.Go(func() {
			for range calls / 16 {
				code, _ := s.raw(t, "GET", "/v1/lease", "")
				codes <- code
			}
		})
	}
	wg.Wait()
	close(codes)
	refused := 0
	for c := range codes {
		if c == http.StatusTooManyRequests {
			refused++
		}
	}
	if refused < calls/16*16-1 {
		t.Errorf("%d of %d calls refused, want all but one", refused, calls/16*16)
	}
	// The other volume's socket is not held up.
	if code, _ := dialSocket(t, f.env.InPodView(tb)).call(t, "GET", "/v1/lease", ""); code != http.StatusOK {
		t.Errorf("another pod's socket: %d", code)
	}
	_, metrics, err := f.driver.Scrape("/metrics")
	if err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf(`ephemeral_secrets_lease_api_requests_total{code="429",endpoint="GET /v1/lease",namespace="team-a"} %d`, refused); !strings.Contains(metrics, want) {
		t.Errorf("metrics do not count every refusal (%s):\n%s", want, grepLines(metrics, "lease_api"))
	}
	for _, p := range []kubelet.Pod{a, b} {
		if err := f.kube.Unpublish(ctx, p, "db"); err != nil {
			t.Fatal(err)
		}
	}
	// The socket closed: every refusal is in the trail, most summarised.
	audited, stood := 0, 0
	for _, r := range auditOf(t, f) {
		if r["stage"] == "api" && r["outcome"] == "refused" {
			audited++
			detail := fmt.Sprint(r["detail"])
			var more int
			if _, err := fmt.Sscanf(detail, "GET /v1/lease -> 429 (and %d more", &more); err == nil {
				stood += more
			} else if _, err := fmt.Sscanf(detail, "%d more refused", &more); err == nil {
				stood += more - 1 // a summary, not a call of its own
			}
		}
	}
	if audited > 10 {
		t.Errorf("%d refusals audited for %d refused calls: the flood reached the audit trail", audited, refused)
	}
	if audited+stood != refused {
		t.Errorf("audited %d records standing for %d more, of %d refused", audited, stood, refused)
	}
}
