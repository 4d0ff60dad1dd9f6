package leaseapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"path"
	"strings"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/audit"
	"github.com/ephemeral-secrets/csi-driver/pkg/lease"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/render"
)

// The endpoints, as counted and audited: their patterns.
const (
	epLease  = "GET /v1/lease"
	epRevoke = "POST /v1/lease/revoke"
	epRotate = "POST /v1/lease/rotate"
	epTasks  = "GET /v1/tasks"
	epTask   = "POST /v1/tasks"
	epEnd    = "DELETE /v1/tasks/{task}"
)

// epOther names, in the audit and the metric, a call that reached no
// endpoint: an unknown or unclean path, a method an endpoint does not take.
const epOther = "other"

// call is one request being answered: what its audit record says and, once
// a route ran, its answer.
type call struct {
	volumeID, endpoint string
	pod                provider.Pod
	leaseID, task      string
	// quiet: the call is not audited (a rate-limit refusal past the audit's
	// own rate); held: how many such calls the record stands for.
	quiet bool
	held  int
	// routed: a route answered (code, body, err); else the mux found none.
	routed bool
	code   int
	body   any
	err    error
}

// callKey carries a *call from the socket's handler to the route the mux
// picks.
type callKey struct{}

// apiError is an answer other than success: its status and reason.
type apiError struct {
	code   int
	reason string
}

func (e *apiError) Error() string { return e.reason }

func refuse(code int, format string, a ...any) error {
	return &apiError{code: code, reason: fmt.Sprintf(format, a...)}
}

// clean reports whether p is a path ServeMux takes as it is: absolute, no
// empty, "." or ".." segment, no trailing slash. ServeMux answers any
// other path with a redirect of its own, before a route runs.
func clean(p string) bool {
	return strings.HasPrefix(p, "/") && path.Clean(p) == p
}

// handler serves one volume's socket. Every request passes here whatever
// its path or method: it is rate-limited, answered, counted and audited
// here, and the mux only picks the route. A path the mux would redirect is
// refused before the mux sees it, and what the mux would answer itself (a
// redirect, 404, 405) is never sent: the call is answered as unknown.
func (s *Server) handler(volumeID string, sk *socket) http.Handler {
	mux := http.NewServeMux()
	route := func(endpoint string, h func(ctx context.Context, c *call, r *http.Request) (int, any, error)) {
		mux.HandleFunc(endpoint, func(_ http.ResponseWriter, r *http.Request) {
			c := r.Context().Value(callKey{}).(*call)
			c.routed = true
			c.code, c.body, c.err = h(r.Context(), c, r)
		})
	}
	route(epLease, s.getLease)
	route(epRevoke, s.revoke)
	route(epRotate, s.rotate)
	route(epTasks, s.listTasks)
	route(epTask, s.issueTask)
	route(epEnd, s.endTask)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		served(r.Context())
		c := &call{volumeID: volumeID, endpoint: epOther}
		if clean(r.URL.Path) {
			// The endpoints are named by their patterns.
			if _, pattern := mux.Handler(r); pattern != "" {
				c.endpoint = pattern
			}
		}
		if info, err := s.Leases.Info(volumeID); err == nil {
			c.pod, c.leaseID = info.Pod, info.LeaseID
		}
		switch {
		case !sk.limiter.AllowN(s.clock.Now(), 1):
			c.err = refuse(http.StatusTooManyRequests, "rate limit: at most %g calls a second on this volume", s.opts.Rate)
			s.refused(sk, c)
		case !clean(r.URL.Path):
			c.err = refuse(http.StatusBadRequest, "the path is not in clean form (no empty, . or .. segment, no trailing /); this socket does not redirect")
		default:
			r.Body = http.MaxBytesReader(w, r.Body, MaxBody)
			mux.ServeHTTP(discard{}, r.WithContext(context.WithValue(r.Context(), callKey{}, c)))
			if !c.routed {
				c.err = refuse(http.StatusNotFound, "no such endpoint: see GET /v1/lease, POST /v1/lease/revoke, POST /v1/lease/rotate, GET|POST /v1/tasks, DELETE /v1/tasks/{task}")
			}
		}
		s.answer(w, c)
	})
}

// rejected accounts for a request the HTTP server refused before the
// handler (its answer, 400 or 431, was the server's): counted and limited
// like any call, audited like a refusal (summarised in a flood).
func (s *Server) rejected(volumeID string, sk *socket) {
	c := &call{volumeID: volumeID, endpoint: epOther,
		err: refuse(http.StatusBadRequest, "refused by the HTTP server before any handler: a malformed or unfinished request, or headers over 8 KiB")}
	if info, err := s.Leases.Info(volumeID); err == nil {
		c.pod, c.leaseID = info.Pod, info.LeaseID
	}
	sk.limiter.AllowN(s.clock.Now(), 1)
	s.refused(sk, c)
	s.account(c, http.StatusBadRequest, audit.Refused, c.err)
}

// discard is the ResponseWriter the mux gets: the routes answer through
// their call, and whatever the mux would write itself is dropped.
type discard struct{}

func (discard) Header() http.Header         { return http.Header{} }
func (discard) Write(b []byte) (int, error) { return len(b), nil }
func (discard) WriteHeader(int)             {}

// answer writes the reply, audits the call and counts it.
func (s *Server) answer(w http.ResponseWriter, c *call) {
	code, body, err := c.code, c.body, c.err
	outcome := audit.Success
	if err != nil {
		var ae *apiError
		if !errors.As(err, &ae) {
			ae = &apiError{code: statusOf(err), reason: err.Error()}
		}
		code, body = ae.code, map[string]string{"error": ae.reason}
		outcome = audit.Error
		if code == http.StatusTooManyRequests || code == http.StatusBadRequest || code == http.StatusRequestEntityTooLarge {
			outcome = audit.Refused
		}
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(body)
	s.account(c, code, outcome, err)
}

// account counts c, answered with code, and audits it unless it is held
// back (c.quiet).
func (s *Server) account(c *call, code int, outcome string, err error) {
	s.opts.Metric.LeaseAPI(c.pod.Namespace, c.endpoint, code)
	if c.quiet {
		return
	}
	rec := audit.Record{Stage: audit.API, VolumeID: c.volumeID, Pod: c.pod, LeaseID: c.leaseID, Task: c.task,
		Outcome: outcome, Detail: fmt.Sprintf("%s -> %d", c.endpoint, code)}
	if c.held > 0 {
		rec.Detail += fmt.Sprintf(" (and %s)", heldDetail(c.held))
	}
	if err != nil {
		rec.Error = err.Error()
	}
	_ = s.opts.Audit.Log(rec)
}

// heldDetail says how many refusals a record stands for beside its own call.
func heldDetail(n int) string {
	return fmt.Sprintf("%d more refused since the last record (by the rate limit, or malformed)", n)
}

// statusOf maps the manager's errors to HTTP statuses.
func statusOf(err error) int {
	switch {
	case errors.Is(err, lease.ErrTaskLimit):
		return http.StatusTooManyRequests
	case errors.Is(err, lease.ErrInvalidTask), errors.Is(err, render.ErrInvalidSpec):
		return http.StatusBadRequest
	case errors.Is(err, lease.ErrUnknownTask):
		return http.StatusNotFound
	case errors.Is(err, lease.ErrTaskExists):
		return http.StatusConflict
	case errors.Is(err, lease.ErrWithdrawn), errors.Is(err, lease.ErrUnknownVolume), errors.Is(err, lease.ErrNoLeaseAPI):
		return http.StatusGone
	case errors.Is(err, provider.ErrPermissionDenied):
		return http.StatusForbidden
	case errors.Is(err, provider.ErrUnavailable):
		return http.StatusServiceUnavailable
	}
	return http.StatusInternalServerError
}

// decode reads a JSON body into v; an empty body leaves v as it is.
func decode(r *http.Request, v any) error {
	data, err := io.ReadAll(r.Body)
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			return refuse(http.StatusRequestEntityTooLarge, "body larger than %d bytes", MaxBody)
		}
		return refuse(http.StatusBadRequest, "reading the body: %v", err)
	}
	if len(strings.TrimSpace(string(data))) == 0 {
		return nil
	}
	dec := json.NewDecoder(strings.NewReader(string(data)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return refuse(http.StatusBadRequest, "body is not the JSON this endpoint takes: %v", err)
	}
	return nil
}

// duration reads an optional duration ("30s"), at most limit.
func duration(field, v string, limit time.Duration) (time.Duration, error) {
	if v == "" {
		return 0, nil
	}
	d, err := time.ParseDuration(v)
	if err != nil || d < 0 {
		return 0, refuse(http.StatusBadRequest, "%s %q is not a duration such as \"30s\"", field, v)
	}
	if limit > 0 && d > limit {
		return 0, refuse(http.StatusBadRequest, "%s %s is above the %s this node allows", field, d, limit)
	}
	return d, nil
}

func (s *Server) getLease(_ context.Context, c *call, _ *http.Request) (int, any, error) {
	info, err := s.Leases.Info(c.volumeID)
	if err != nil {
		return 0, nil, err
	}
	return http.StatusOK, info, nil
}

// waitBody is the body of the revoking calls: how long to wait for the
// backend's confirmation (none: do not wait).
type waitBody struct {
	Wait string `json:"wait"`
}

// revoked is the answer of a revoking call.
type revoked struct {
	LeaseID   string `json:"leaseID,omitempty"`
	Task      string `json:"task,omitempty"`
	Confirmed bool   `json:"confirmed"`
	// Status says what the caller may rely on.
	Status string `json:"status"`
}

// waitArg reads the body of a revoking call.
func (s *Server) waitArg(r *http.Request) (time.Duration, error) {
	var b waitBody
	if err := decode(r, &b); err != nil {
		return 0, err
	}
	return duration("wait", b.Wait, s.opts.MaxWait)
}

// waitFor waits up to wait for confirmed and answers: 200 once the
// backend confirmed, 202 while it is still queued.
func (s *Server) waitFor(ctx context.Context, wait time.Duration, confirmed <-chan error, answer revoked) (int, any, error) {
	answer.Status = "files removed; revocation queued"
	timer := time.NewTimer(wait)
	defer timer.Stop()
	select {
	case err := <-confirmed:
		if err == nil {
			answer.Confirmed, answer.Status = true, "revoked: the backend confirmed"
			return http.StatusOK, answer, nil
		}
		if errors.Is(err, provider.ErrNotRevocable) {
			// A final answer: the backend will never do more (an STS session).
			answer.Status = "files removed; the backend cannot revoke this credential: it stays valid until it expires"
			return http.StatusOK, answer, nil
		}
		answer.Status += "; " + err.Error()
	case <-timer.C:
		if wait > 0 {
			answer.Status += "; not confirmed within " + wait.String() + ", retried until it is"
		}
	case <-ctx.Done():
	}
	return http.StatusAccepted, answer, nil
}

func (s *Server) revoke(ctx context.Context, c *call, r *http.Request) (int, any, error) {
	// The body first: a malformed call gives nothing back.
	wait, err := s.waitArg(r)
	if err != nil {
		return 0, nil, err
	}
	confirmed, err := s.Leases.Withdraw(ctx, c.volumeID, "given back")
	if err != nil {
		return 0, nil, err
	}
	return s.waitFor(ctx, wait, confirmed, revoked{LeaseID: c.leaseID})
}

func (s *Server) rotate(ctx context.Context, c *call, r *http.Request) (int, any, error) {
	if err := decode(r, &struct{}{}); err != nil {
		return 0, nil, err
	}
	info, err := s.Leases.RotateNow(ctx, c.volumeID)
	if err != nil {
		return 0, nil, err
	}
	c.leaseID = info.LeaseID
	return http.StatusOK, info, nil
}

func (s *Server) listTasks(_ context.Context, c *call, _ *http.Request) (int, any, error) {
	info, err := s.Leases.Info(c.volumeID)
	if err != nil {
		return 0, nil, err
	}
	return http.StatusOK, map[string]any{"tasks": info.Tasks, "maxTasks": info.MaxTasks}, nil
}

// taskBody is the body of POST /v1/tasks.
type taskBody struct {
	Task string `json:"task"`
	// TTL shortens the task lease's life below the class's.
	TTL string `json:"ttl"`
}

func (s *Server) issueTask(ctx context.Context, c *call, r *http.Request) (int, any, error) {
	var b taskBody
	if err := decode(r, &b); err != nil {
		return 0, nil, err
	}
	if err := lease.ValidTask(b.Task); err != nil {
		return 0, nil, refuse(http.StatusBadRequest, "%v", err)
	}
	c.task = b.Task
	ttl, err := duration("ttl", b.TTL, 0)
	if err != nil {
		return 0, nil, err
	}
	t, err := s.Leases.IssueTask(ctx, c.volumeID, b.Task, ttl)
	if err != nil {
		return 0, nil, err
	}
	c.leaseID = t.LeaseID
	return http.StatusCreated, t, nil
}

func (s *Server) endTask(ctx context.Context, c *call, r *http.Request) (int, any, error) {
	task := r.PathValue("task")
	if err := lease.ValidTask(task); err != nil {
		return 0, nil, refuse(http.StatusBadRequest, "%v", err)
	}
	c.task = task
	wait, err := s.waitArg(r)
	if err != nil {
		return 0, nil, err
	}
	info, _ := s.Leases.Info(c.volumeID)
	for _, t := range info.Tasks {
		if t.Task == task {
			c.leaseID = t.LeaseID
		}
	}
	confirmed, err := s.Leases.RevokeTask(ctx, c.volumeID, task)
	if err != nil {
		return 0, nil, err
	}
	return s.waitFor(ctx, wait, confirmed, revoked{LeaseID: c.leaseID, Task: task})
}
