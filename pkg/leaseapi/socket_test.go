package leaseapi

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	clocktesting "k8s.io/utils/clock/testing"

	"github.com/ephemeral-secrets/csi-driver/pkg/audit"
	"github.com/ephemeral-secrets/csi-driver/pkg/lease"
	"github.com/ephemeral-secrets/csi-driver/pkg/metrics"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/storage"
)

// volume is the lease manager as the socket sees it for one volume: these
// tests are of the socket's edge (paths, limits, audit), not of leases,
// which pkg/lease and test/e2e exercise through the real manager.
type volume struct{ pod provider.Pod }

func (v volume) Info(id string) (lease.Info, error) {
	return lease.Info{VolumeID: id, Pod: v.pod, LeaseID: "l-1", Provider: "postgres", State: "live"}, nil
}

func (v volume) Withdraw(context.Context, string, string) (<-chan error, error) {
	ch := make(chan error, 1)
	ch <- nil
	return ch, nil
}

func (v volume) RotateNow(_ context.Context, id string) (lease.Info, error) { return v.Info(id) }

func (v volume) IssueTask(context.Context, string, string, time.Duration) (lease.TaskInfo, error) {
	return lease.TaskInfo{}, lease.ErrTaskLimit
}

func (v volume) RevokeTask(context.Context, string, string) (<-chan error, error) {
	return nil, lease.ErrUnknownTask
}

// trail is an audit trail in memory, safe to read while written.
type trail struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (t *trail) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.buf.Write(p)
}

func (t *trail) records(tb testing.TB) []audit.Record {
	tb.Helper()
	t.mu.Lock()
	defer t.mu.Unlock()
	var recs []audit.Record
	dec := json.NewDecoder(bytes.NewReader(t.buf.Bytes()))
	for {
		var r audit.Record
		if err := dec.Decode(&r); err == io.EOF {
			return recs
		} else if err != nil {
			tb.Fatal(err)
		}
		recs = append(recs, r)
	}
}

// heldCount matches the count of refusals a record stands for beside its
// own call ("(and 3 more refused since the last record ...)"), or instead
// of one: a summary of held refusals ("3 more refused since ...").
var heldCount = regexp.MustCompile(`^(.*?)(\d+) more refused since the last record`)

// calls is how many socket calls the API records account for.
func calls(tb testing.TB, recs []audit.Record) int {
	tb.Helper()
	n := 0
	for _, r := range recs {
		if r.Stage != audit.API {
			tb.Errorf("record of stage %q on the socket", r.Stage)
			continue
		}
		m := heldCount.FindStringSubmatch(r.Detail)
		if m == nil || m[1] != "" {
			n++ // the record of a call
		}
		if m != nil {
			held, _ := strconv.Atoi(m[2])
			n += held
		}
	}
	return n
}

// socketFixture is a Server with one volume's socket open.
type socketFixture struct {
	srv    *Server
	trail  *trail
	metric *metrics.Metrics
	path   string
	id     string
}

func newSocketFixture(t *testing.T, opts Options) *socketFixture {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to give the socket to a group")
	}
	dir := t.TempDir()
	f := &socketFixture{trail: &trail{}, id: "vol-1", path: filepath.Join(dir, storage.SocketName)}
	f.metric = metrics.New(func() metrics.State { return metrics.State{} })
	opts.Dir = func(string) string { return dir }
	opts.Audit, opts.Metric = audit.New(f.trail), f.metric
	f.srv = New(opts)
	f.srv.Leases = volume{pod: provider.Pod{Namespace: "team-a", Name: "agent"}}
	if err := f.srv.Open(f.id, 0); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.srv.Close(f.id) })
	return f
}

// do sends one request, its request line written as given (no client
// cleans it), and returns the answer's status.
func (f *socketFixture) do(t *testing.T, method, target string) int {
	t.Helper()
	c, err := net.Dial("unix", f.path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := fmt.Fprintf(c, "%s %s HTTP/1.1\r\nHost: volume\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", method, target); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// counted returns the lease socket's request counter by its labels, and
// its sum.
func (f *socketFixture) counted(t *testing.T) (map[string]int, int) {
	t.Helper()
	rec := httptest.NewRecorder()
	f.metric.Handler(metrics.Health{}).ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	const name = "ephemeral_secrets_lease_api_requests_total"
	by, sum := map[string]int{}, 0
	for line := range strings.Lines(rec.Body.String()) {
		line = strings.TrimSpace(line)
		i := strings.LastIndexByte(line, ' ')
		if !strings.HasPrefix(line, name+"{") || i < 0 {
			continue
		}
		labels, value := line[len(name):i], line[i+1:]
		v, err := strconv.ParseFloat(value, 64)
		if err != nil {
			t.Fatal(err)
		}
		by[labels] += int(v)
		sum += int(v)
	}
	return by, sum
}

// Every request, whatever its path, is counted, rate-limited and audited;
// an unclean path is refused with a 4xx, not redirected by ServeMux before
// any of that runs (the redirect would let a pod call in a loop unseen).
func TestEveryPathCountedLimitedAudited(t *testing.T) {
	unclean := []struct{ method, target string }{
		{"GET", "//v1/lease"},
		{"POST", "/v1/tasks/../lease/revoke"},
		{"POST", "/v1//lease/revoke"},
		{"POST", "/v1/./lease/rotate"},
		{"GET", "/v1/lease/"},
		{"DELETE", "/v1/tasks/a/../b"},
	}
	// The burst is spent by the unclean calls alone: the next call, clean,
	// is refused by the rate limit only if they were counted against it.
	f := newSocketFixture(t, Options{Rate: 0.001, Burst: len(unclean)})
	for _, u := range unclean {
		if code := f.do(t, u.method, u.target); code < 400 || code >= 500 {
			t.Errorf("%s %s: %d, want a 4xx refusal", u.method, u.target, code)
		}
	}
	if code := f.do(t, "GET", "/v1/lease"); code != http.StatusTooManyRequests {
		t.Errorf("a clean call after the burst was spent by unclean ones: %d, want 429", code)
	}
	recs := f.trail.records(t)
	if len(recs) != len(unclean)+1 {
		t.Errorf("%d audit records for %d calls: %+v", len(recs), len(unclean)+1, recs)
	}
	for _, r := range recs[:min(len(recs), len(unclean))] {
		if r.Outcome != audit.Refused || r.VolumeID != f.id || r.Pod.Namespace != "team-a" {
			t.Errorf("record of an unclean call: %+v, want refused, of %s and its pod", r, f.id)
		}
	}
	by, n := f.counted(t)
	if n != len(unclean)+1 {
		t.Errorf("lease_api_requests_total counts %d calls, want %d: %v", n, len(unclean)+1, by)
	}
	for labels, want := range map[string]int{
		`{code="400",endpoint="other",namespace="team-a"}`:         len(unclean),
		`{code="429",endpoint="GET /v1/lease",namespace="team-a"}`: 1,
	} {
		if by[labels] != want {
			t.Errorf("lease_api_requests_total%s = %d, want %d: %v", labels, by[labels], want, by)
		}
	}
}

// A flood of refused calls reaches the audit trail in full, summarised:
// the refusals held back by the audit's own rate are written when the
// socket closes, not only with a later refusal that may never come.
func TestHeldRefusalsWrittenWhenSocketCloses(t *testing.T) {
	f := newSocketFixture(t, Options{Rate: 0.001, Burst: 1})
	const flood = 40
	for i := range flood {
		want := http.StatusTooManyRequests
		if i == 0 {
			want = http.StatusOK
		}
		if code := f.do(t, "GET", "/v1/lease"); code != want {
			t.Fatalf("call %d: %d, want %d", i, code, want)
		}
	}
	recs := f.trail.records(t)
	if len(recs) >= flood {
		t.Fatalf("%d records for %d calls: the refusals were not summarised", len(recs), flood)
	}
	f.srv.Close(f.id)
	if n := calls(t, f.trail.records(t)); n != flood {
		t.Errorf("the audit trail accounts for %d of %d calls after the socket closed", n, flood)
	}
}

// Refusals held back by the audit's own rate reach the trail within
// HeldFlush of the first held, though no later call comes and the socket
// stays open.
func TestHeldRefusalsWrittenWithinHeldFlush(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
	f := newSocketFixture(t, Options{Rate: 0.001, Burst: 1, Clock: clk})
	const flood = 40
	for range flood {
		f.do(t, "GET", "/v1/lease")
	}
	if n := calls(t, f.trail.records(t)); n >= flood {
		t.Fatalf("the trail accounts for %d of %d calls before any flush: nothing was held back", n, flood)
	}
	clk.Step(HeldFlush - time.Millisecond)
	if n := calls(t, f.trail.records(t)); n >= flood {
		t.Fatalf("held refusals written before HeldFlush: %d of %d", n, flood)
	}
	clk.Step(time.Millisecond)
	if n := calls(t, f.trail.records(t)); n != flood {
		t.Errorf("the audit trail accounts for %d of %d calls HeldFlush after the flood", n, flood)
	}
	recs := f.trail.records(t)
	last := recs[len(recs)-1]
	if last.Outcome != audit.Refused || last.Pod.Namespace != "team-a" || last.VolumeID != f.id {
		t.Errorf("summary record %+v: want refused, of the volume and its pod", last)
	}
	// The next flood is held and flushed again.
	for range 3 {
		f.do(t, "GET", "/v1/lease")
	}
	clk.Step(HeldFlush)
	if n := calls(t, f.trail.records(t)); n != flood+3 {
		t.Errorf("the audit trail accounts for %d of %d calls after a second flood", n, flood+3)
	}
}

// Requests the HTTP server answers itself, before any handler (a malformed
// request line, headers over the limit, a request left unfinished), are
// counted, limited and audited like every other call; a connection closed
// before its first byte is no call, and a served keep-alive connection is
// not counted twice.
func TestRequestsRefusedBeforeTheHandlerAreAccounted(t *testing.T) {
	f := newSocketFixture(t, Options{Rate: 0.001, Burst: 10})
	send := func(raw string, read bool) {
		t.Helper()
		c, err := net.Dial("unix", f.path)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, err := io.WriteString(c, raw); err != nil {
			t.Fatal(err)
		}
		if read {
			_, _ = io.ReadAll(c) // the server's own 400/431, then its close
		}
	}
	send("GARBAGE\r\n\r\n", true)
	send("GET /v1/lease HTTP/1.1\r\nHost: volume\r\nX-Big: "+strings.Repeat("a", 16<<10)+"\r\n\r\n", true)
	send("GET /v1/lease HTTP/1.1\r\nHo", false) // unfinished, then closed
	send("", false)                             // no byte: no call
	// Two calls on one connection, both served: two calls, not three.
	send("GET /v1/lease HTTP/1.1\r\nHost: volume\r\n\r\nGET /v1/lease HTTP/1.1\r\nHost: volume\r\nConnection: close\r\n\r\n", true)
	const want = 5
	var n int
	for range 100 { // the server accounts for a connection as it closes it
		if _, n = f.counted(t); n >= want {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	by, n := f.counted(t)
	if n != want || by[`{code="400",endpoint="other",namespace="team-a"}`] != 3 {
		t.Errorf("lease_api_requests_total: %d calls %v, want %d of which 3 refused before the handler", n, by, want)
	}
	// They spent the volume's rate limit like any call: 10 - 5 left.
	for i := range 6 {
		code := f.do(t, "GET", "/v1/lease")
		if i < 5 && code != http.StatusOK || i == 5 && code != http.StatusTooManyRequests {
			t.Fatalf("call %d after the rejected ones: %d", i, code)
		}
	}
	f.srv.Close(f.id)
	recs := f.trail.records(t)
	if got := calls(t, recs); got != want+6 {
		t.Errorf("the audit trail accounts for %d of %d calls: %+v", got, want+6, recs)
	}
	refused := 0
	for _, r := range recs {
		if r.Outcome == audit.Refused && strings.Contains(r.Error, "before any handler") && r.Pod.Name == "agent" {
			refused++
		}
	}
	if refused == 0 {
		t.Errorf("no refused record names the HTTP server's refusal and the pod: %+v", recs)
	}
}
