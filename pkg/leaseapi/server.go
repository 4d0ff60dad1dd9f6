// Package leaseapi serves the lease socket inside a volume: a unix socket
// at the volume's root (lease.sock), HTTP/1.1 with JSON, through which the
// pod gives its credential back, rotates it, or asks for a lease per task.
// Each volume has its own listener, so a connection says which volume it
// is for by the socket it came through: no request names a volume, and
// the socket is reachable only through the pod's own mount (the driver's
// state directory is root's alone). No answer holds a secret value: the
// credentials themselves are files in the volume.
//
// It sits beside pkg/driver, above the state machine: it imports
// pkg/lease (the verbs it serves), pkg/render, pkg/storage (the socket's
// name), pkg/audit, pkg/metrics and pkg/provider.
package leaseapi

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/netutil"
	"golang.org/x/sys/unix"
	"golang.org/x/time/rate"
	"k8s.io/klog/v2"
	"k8s.io/utils/clock"

	"github.com/ephemeral-secrets/csi-driver/pkg/audit"
	"github.com/ephemeral-secrets/csi-driver/pkg/lease"
	"github.com/ephemeral-secrets/csi-driver/pkg/metrics"
	"github.com/ephemeral-secrets/csi-driver/pkg/storage"
)

// Leases is what the socket needs of the lease manager.
type Leases interface {
	Info(volumeID string) (lease.Info, error)
	Withdraw(ctx context.Context, volumeID, reason string) (<-chan error, error)
	RotateNow(ctx context.Context, volumeID string) (lease.Info, error)
	IssueTask(ctx context.Context, volumeID, task string, ttl time.Duration) (lease.TaskInfo, error)
	RevokeTask(ctx context.Context, volumeID, task string) (<-chan error, error)
}

var _ Leases = (*lease.Manager)(nil)

// Options configure a Server. Zero values take the defaults.
type Options struct {
	// Dir returns the directory of a volume's files (the socket goes
	// there, at its root).
	Dir    func(volumeID string) string
	Audit  *audit.Logger
	Metric *metrics.Metrics
	// Rate and Burst limit the requests of one volume (default 5 per
	// second, bursts of 10).
	Rate  float64
	Burst int
	// MaxWait caps how long a revoke waits for the backend's confirmation
	// (default 30 s); a caller asks for less with "wait".
	MaxWait time.Duration
	// Clock times the rate limits and the summary of held refusals
	// (default: the system's).
	Clock clock.WithDelayedExecution
}

// Server runs the lease sockets of the node's volumes. Set Leases before
// the first Open.
type Server struct {
	Leases Leases
	opts   Options
	clock  clock.WithDelayedExecution

	mu    sync.Mutex
	socks map[string]*socket
}

var _ lease.Sockets = (*Server)(nil)

type socket struct {
	srv     *http.Server
	path    string
	limiter *rate.Limiter
	// quiet bounds the audit records of refusals by the rate limit, so
	// that a pod calling in a loop cannot flood the audit trail; the
	// refusals it holds back are counted in the next record, written with
	// the next audited refusal or HeldFlush after the first held, whichever
	// comes first, and at the latest when the socket closes.
	quiet *rate.Limiter

	mu sync.Mutex // guards what follows
	// held counts the refusals not audited since the last record; heldOf
	// is the call that last added to it (its pod and lease).
	held    int
	heldOf  call
	flusher bool // a flush of held is scheduled
	closed  bool // the socket closed: nothing more is held

	conns conns
}

// conns follows the socket's connections, to find the requests the HTTP
// server answered without calling the handler. The server marks a
// connection active once it read a byte of a request, idle once a request
// was served in full, and closes it after refusing a request itself; the
// handler marks the connection served. A connection closed while active
// and unserved ended with a request no handler saw.
type conns struct {
	mu sync.Mutex
	m  map[net.Conn]*conn
}

type conn struct{ active, served atomic.Bool }

// connKey carries a connection's *conn to the handler.
type connKey struct{}

// track is the server's ConnContext: it starts following c.
func (cs *conns) track(ctx context.Context, c net.Conn) context.Context {
	st := &conn{}
	cs.mu.Lock()
	if cs.m == nil {
		cs.m = map[net.Conn]*conn{}
	}
	cs.m[c] = st
	cs.mu.Unlock()
	return context.WithValue(ctx, connKey{}, st)
}

// served marks the connection of the request ctx belongs to as served.
func served(ctx context.Context) {
	if st, ok := ctx.Value(connKey{}).(*conn); ok {
		st.served.Store(true)
	}
}

// unserved is the server's ConnState: it tells whether c, reaching st,
// ended with a request that no handler saw.
func (cs *conns) unserved(c net.Conn, st http.ConnState) bool {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	s := cs.m[c]
	if s == nil {
		return false
	}
	switch st {
	case http.StateActive:
		s.active.Store(true)
	case http.StateIdle:
		s.active.Store(false)
		s.served.Store(false)
	case http.StateClosed, http.StateHijacked:
		delete(cs.m, c)
		return s.active.Load() && !s.served.Load()
	}
	return false
}

// HeldFlush is how long a refusal held back from the audit trail waits at
// most for a record that counts it.
const HeldFlush = time.Second

// MaxBody bounds a request's body; MaxConns the connections one socket
// serves at once (more wait in the listen queue).
const (
	MaxBody  = 4 << 10
	MaxConns = 8
)

// New returns a Server with no socket open.
func New(opts Options) *Server {
	if opts.Rate <= 0 {
		opts.Rate = 5
	}
	if opts.Burst <= 0 {
		opts.Burst = 10
	}
	if opts.MaxWait <= 0 {
		opts.MaxWait = 30 * time.Second
	}
	if opts.Clock == nil {
		opts.Clock = clock.RealClock{}
	}
	return &Server{opts: opts, clock: opts.Clock, socks: map[string]*socket{}}
}

// Open listens on the volume's socket, root:gid 0660 (root only when gid
// < 0). Opening an open socket is fine.
func (s *Server) Open(volumeID string, gid int) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.socks[volumeID]; ok {
		return nil
	}
	path := filepath.Join(s.opts.Dir(volumeID), storage.SocketName)
	ln, err := listen(path, max(gid, 0))
	if err != nil {
		return err
	}
	sk := &socket{path: path, limiter: rate.NewLimiter(rate.Limit(s.opts.Rate), s.opts.Burst), quiet: rate.NewLimiter(1, 5)}
	sk.srv = &http.Server{
		Handler:           s.handler(volumeID, sk),
		ReadHeaderTimeout: 2 * time.Second,
		ReadTimeout:       5 * time.Second,
		WriteTimeout:      s.opts.MaxWait + 10*time.Second,
		IdleTimeout:       30 * time.Second,
		MaxHeaderBytes:    8 << 10,
		ErrorLog:          nil,
		// A request the HTTP server refuses itself (a malformed request
		// line or header, headers over MaxHeaderBytes, one left
		// unfinished past the timeouts) never reaches the handler: the
		// connection's states tell it, and it is accounted as a call.
		ConnContext: sk.conns.track,
		ConnState: func(c net.Conn, st http.ConnState) {
			if sk.conns.unserved(c, st) {
				s.rejected(volumeID, sk)
			}
		},
	}
	s.socks[volumeID] = sk
	go func() {
		if err := sk.srv.Serve(netutil.LimitListener(ln, MaxConns)); err != nil && !errors.Is(err, http.ErrServerClosed) {
			klog.ErrorS(err, "Lease socket stopped", "volumeID", volumeID)
		}
	}()
	return nil
}

// Close stops the volume's socket and removes it; closing a closed one
// is fine.
func (s *Server) Close(volumeID string) {
	s.mu.Lock()
	sk := s.socks[volumeID]
	delete(s.socks, volumeID)
	s.mu.Unlock()
	if sk == nil {
		return
	}
	_ = sk.srv.Close()
	_ = os.Remove(sk.path)
	s.flushHeld(sk, true)
}

// Shutdown stops every socket, leaving the socket files: the next start
// listens on them again.
func (s *Server) Shutdown() {
	s.mu.Lock()
	socks := s.socks
	s.socks = map[string]*socket{}
	s.mu.Unlock()
	for _, sk := range socks {
		_ = sk.srv.Close()
		s.flushHeld(sk, true)
	}
}

// refused accounts for c, a call refused by the rate limit: either it is
// audited, standing for the refusals held before it too, or it is held
// back (c.quiet) and a flush of what is held is scheduled.
func (s *Server) refused(sk *socket, c *call) {
	sk.mu.Lock()
	if sk.closed || sk.quiet.AllowN(s.clock.Now(), 1) {
		c.held, sk.held = sk.held, 0
		sk.mu.Unlock()
		return
	}
	c.quiet = true
	sk.held++
	sk.heldOf = *c
	schedule := !sk.flusher
	sk.flusher = true
	sk.mu.Unlock()
	// Outside sk.mu: a fake clock runs the function as it is stepped,
	// holding its own lock.
	if schedule {
		s.clock.AfterFunc(HeldFlush, func() { s.flushHeld(sk, false) })
	}
}

// flushHeld writes a record of the refusals held back, if any; closing:
// the socket closed, and what would be held from now on is audited.
func (s *Server) flushHeld(sk *socket, closing bool) {
	sk.mu.Lock()
	n, c := sk.held, sk.heldOf
	sk.held = 0
	if closing {
		sk.closed = true
	} else {
		sk.flusher = false
	}
	sk.mu.Unlock()
	if n == 0 {
		return
	}
	_ = s.opts.Audit.Log(audit.Record{Stage: audit.API, VolumeID: c.volumeID, Pod: c.pod, LeaseID: c.leaseID,
		Outcome: audit.Refused, Detail: heldDetail(n)})
}

// listen binds a unix socket at path, owned root:gid, mode 0660. It binds
// through /proc/self/fd/N/<name>, N the directory opened: a volume's
// directory can be longer than the 107 bytes a socket address holds, and
// the directory cannot be swapped for a link between the check and the
// bind. A stale socket of an earlier run is replaced.
func listen(path string, gid int) (net.Listener, error) {
	dir, name := filepath.Split(path)
	dfd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("lease socket directory: %w", err)
	}
	defer unix.Close(dfd)
	_ = unix.Unlinkat(dfd, name, 0)
	addr := fmt.Sprintf("/proc/self/fd/%d/%s", dfd, name)
	// Connecting takes write access, which the umask (022) keeps from the
	// group until the socket is the group's; and the directory is reachable
	// only by root and, through the pod's mount, the pod.
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: addr, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("lease socket: %w", err)
	}
	ln.SetUnlinkOnClose(false)
	if err := unix.Fchownat(dfd, name, 0, gid, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		_ = ln.Close()
		return nil, fmt.Errorf("lease socket owner: %w", err)
	}
	if err := unix.Fchmodat(dfd, name, 0o660, 0); err != nil {
		_ = ln.Close()
		return nil, fmt.Errorf("lease socket mode: %w", err)
	}
	return ln, nil
}
