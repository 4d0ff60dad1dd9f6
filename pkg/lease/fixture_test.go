package lease

import (
	"context"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"golang.org/x/sys/unix"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/ephemeral-secrets/csi-driver/pkg/issuer"
	pgengine "github.com/ephemeral-secrets/csi-driver/pkg/issuer/postgres"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider/postgres"
	"github.com/ephemeral-secrets/csi-driver/pkg/render"
	"github.com/ephemeral-secrets/csi-driver/pkg/spc"
	"github.com/ephemeral-secrets/csi-driver/pkg/storage"
	"github.com/ephemeral-secrets/csi-driver/pkg/storage/memory"
	"github.com/ephemeral-secrets/csi-driver/test/fakeprovider"
	"github.com/ephemeral-secrets/csi-driver/test/pgtest"
)

// pg is a real PostgreSQL server shared by the tests that need one,
// started on first use and stopped by TestMain.
var pg *pgtest.Server

func TestMain(m *testing.M) {
	code := m.Run()
	if pg != nil {
		pg.Close()
	}
	os.Exit(code)
}

// needPostgres starts the shared server on first use.
func needPostgres(t testing.TB) *pgtest.Server {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount tmpfs and run PostgreSQL as its system user")
	}
	if pg == nil {
		var err error
		if pg, err = pgtest.Start(); err != nil {
			t.Fatal(err)
		}
	}
	return pg
}

// classMap resolves classes from a map keyed "namespace/name"; it stands in
// for the informer cache, which this package does not test.
type classMap map[string]*spc.Class

func (c classMap) Resolve(_ context.Context, ns, name string) (*spc.Class, error) {
	if cl, ok := c[ns+"/"+name]; ok {
		return cl, nil
	}
	return nil, fmt.Errorf("%w: %s/%s", spc.ErrClassNotFound, ns, name)
}

// node is one test node of a tier: its volume store, its backend and
// kubelet's pod directories.
//
// The unprivileged tier ("memory", newMemoryNode) keeps the store in
// memory (pkg/storage/memory) and the backend in a ledger
// (test/fakeprovider), on a fake clock: it runs as any user, without
// PostgreSQL, and never sleeps. The privileged tier ("tmpfs", newNode)
// runs the real tmpfs store and the real PostgreSQL provider against the
// shared server: it needs root and skips otherwise.
type node struct {
	t       testing.TB
	tier    string
	root    string
	raw     RawStore // the raw store
	store   Store    // raw, as the manager reads it
	prov    provider.Provider
	classes classMap
	// clk is the node's fake clock: every manager of the unprivileged
	// tier runs on it; a test of either tier may give it to its manager
	// (Options.Clock) and step it.
	clk     *clocktesting.FakeClock
	backend backend
	files   files
}

// backend is what the tests ask of the backend behind a node's provider.
type backend interface {
	// credential names the credential of a lease as alive lists it (a
	// PostgreSQL role, a ledger's username).
	credential(leaseID string) string
	// alive lists the credentials of this node's pods that exist.
	alive(ctx context.Context) (map[string]bool, error)
	// login reports whether a username and password log in now.
	login(ctx context.Context, user, password string) error
}

// files reads what a pod sees under a target path.
type files interface {
	readFile(path string) ([]byte, error)
	readDir(dir string) ([]string, error)
}

const testNS = "crash"

// tier is one way of running a node.
type tier struct {
	name    string
	newNode func(t testing.TB, ttl time.Duration, creation ...string) *node
}

// tiers are the unprivileged tier, then the privileged one.
var tiers = []tier{{"memory", newMemoryNode}, {"tmpfs", newNode}}

// inTiers runs test as a subtest of each tier, on a node of its own.
func inTiers(t *testing.T, ttl time.Duration, test func(t *testing.T, n *node)) {
	for _, tr := range tiers {
		t.Run(tr.name, func(t *testing.T) { test(t, tr.newNode(t, ttl)) })
	}
}

// classes are the node's classes of provider prov: "db", and "db-tasks"
// with the lease socket.
func classes(prov string, params map[string]string) classMap {
	withSocket := maps.Clone(params)
	withSocket[render.LeaseAPIParam] = "true"
	return classMap{
		testNS + "/db":       {Namespace: testNS, Name: "db", Provider: prov, Parameters: params},
		testNS + "/db-tasks": {Namespace: testNS, Name: "db-tasks", Provider: prov, Parameters: withSocket},
	}
}

// newMemoryNode is a node of the unprivileged tier: leases last ttl,
// renewable up to 4 ttl, as newNode's.
func newMemoryNode(t testing.TB, ttl time.Duration, _ ...string) *node {
	t.Helper()
	clk := clocktesting.NewFakeClock(time.Now())
	mem := memory.New(storage.Options{})
	fp := fakeprovider.New(clk, ttl, 4*ttl)
	return &node{
		t: t, tier: "memory", root: t.TempDir(), raw: mem, store: NewStore(mem), prov: fp,
		classes: classes(fakeName, map[string]string{}), clk: clk,
		backend: ledger{fp}, files: memoryFiles{mem},
	}
}

// fakeName is the provider name of the unprivileged tier's backend.
const fakeName = "fake"

// ledger is the fake backend as the tests ask it.
type ledger struct{ *fakeprovider.Provider }

func (l ledger) credential(leaseID string) string               { return fakeprovider.Name(leaseID) }
func (l ledger) alive(context.Context) (map[string]bool, error) { return l.Alive(), nil }
func (l ledger) login(_ context.Context, u, p string) error     { return l.Login(u, p) }

// memoryFiles reads a path under a target mounted in the memory store.
type memoryFiles struct{ s *memory.Store }

// split finds the mounted target path is under.
func (f memoryFiles) split(p string) (target, rel string, err error) {
	for dir := p; dir != "/" && dir != "."; dir = filepath.Dir(dir) {
		if f.s.IsMounted(dir) {
			rel, _ := filepath.Rel(dir, p)
			return dir, rel, nil
		}
	}
	return "", "", &fs.PathError{Op: "open", Path: p, Err: fs.ErrNotExist}
}

func (f memoryFiles) readFile(p string) ([]byte, error) {
	target, rel, err := f.split(p)
	if err != nil {
		return nil, err
	}
	return f.s.ReadFile(target, rel)
}

func (f memoryFiles) readDir(p string) ([]string, error) {
	target, rel, err := f.split(p)
	if err != nil {
		return nil, err
	}
	return f.s.ReadDir(target, rel)
}

// newNode is a node of the privileged tier: a real tmpfs store, the real
// postgres provider against the shared server (whose roles last ttl, up
// to 4 ttl), and kubelet's pod directories.
func newNode(t testing.TB, ttl time.Duration, creation ...string) *node {
	t.Helper()
	srv := needPostgres(t)
	root := t.TempDir()
	store, err := storage.Open(filepath.Join(root, "state"), storage.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if len(creation) == 0 {
		creation = []string{`CREATE ROLE "{{.Name}}" LOGIN PASSWORD '{{.Password}}' VALID UNTIL '{{.Expiration}}'`}
	}
	iss, err := issuer.New(issuer.Options{Config: pgengine.Config{Connections: map[string]*pgengine.Connection{"main": {
		URL: srv.AdminURL(), MaxConns: 8,
		Roles: map[string]*pgengine.Role{"app": {
			DefaultTTL: pgengine.Duration{Duration: ttl}, MaxTTL: pgengine.Duration{Duration: 4 * ttl},
			CreationStatements: creation,
			Allowed:            []pgengine.Subject{{Namespace: "*", ServiceAccount: "*"}},
		}},
	}}}})
	if err != nil {
		t.Fatal(err)
	}
	prefix := "esc_" + testNS + "_"
	n := &node{
		t: t, tier: "tmpfs", root: root, raw: store, store: NewStore(store), prov: postgres.NewNode(iss.Local()),
		classes: classes(postgres.Name, map[string]string{postgres.ConnectionParam: "main", postgres.RoleParam: "app"}),
		clk:     clocktesting.NewFakeClock(time.Now()),
		backend: roles{srv: srv, prefix: prefix}, files: osFiles{},
	}
	t.Cleanup(func() {
		iss.Close()
		unmountUnder(filepath.Join(root, "pods"))
		entries, _ := os.ReadDir(filepath.Join(store.Root(), "volumes"))
		for _, e := range entries {
			_ = unix.Unmount(filepath.Join(store.Root(), "volumes", e.Name(), "fs"), unix.MNT_DETACH)
		}
		_ = unix.Unmount(store.Root(), unix.MNT_DETACH)
		dropRoles(srv, prefix)
	})
	return n
}

// roles is PostgreSQL as the tests ask it: the roles of this node's pods.
type roles struct {
	srv    *pgtest.Server
	prefix string
}

func (roles) credential(leaseID string) string { return postgres.RoleName(leaseID) }

func (r roles) alive(ctx context.Context) (map[string]bool, error) {
	conn, err := pgx.Connect(ctx, r.srv.AdminURL())
	if err != nil {
		return nil, err
	}
	defer conn.Close(ctx)
	rows, err := conn.Query(ctx, `SELECT rolname FROM pg_roles WHERE rolname LIKE $1`, r.prefix+"%")
	if err != nil {
		return nil, err
	}
	names, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, err
	}
	out := map[string]bool{}
	for _, name := range names {
		out[name] = true
	}
	return out, nil
}

func (r roles) login(ctx context.Context, user, password string) error {
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	conn, err := pgx.Connect(cctx, r.srv.URL(user, password))
	if err != nil {
		return fmt.Errorf("login as %s: %w", user, err)
	}
	return conn.Close(ctx)
}

// osFiles reads a real mount.
type osFiles struct{}

func (osFiles) readFile(p string) ([]byte, error) { return os.ReadFile(p) }

func (osFiles) readDir(dir string) ([]string, error) {
	entries, err := os.ReadDir(dir)
	var out []string
	for _, e := range entries {
		out = append(out, e.Name())
	}
	return out, err
}

func unmountUnder(dir string) {
	data, _ := os.ReadFile("/proc/self/mountinfo")
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && strings.HasPrefix(f[4], dir+"/") {
			_ = unix.Unmount(f[4], unix.MNT_DETACH)
		}
	}
}

func dropRoles(srv *pgtest.Server, prefix string) {
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, srv.AdminURL())
	if err != nil {
		return
	}
	defer conn.Close(ctx)
	rows, _ := conn.Query(ctx, `SELECT rolname FROM pg_roles WHERE rolname LIKE $1`, prefix+"%")
	names, _ := pgx.CollectRows(rows, pgx.RowTo[string])
	for _, n := range names {
		_, _ = conn.Exec(ctx, `DROP ROLE IF EXISTS "`+n+`"`)
	}
}

// registry registers p as the provider the node's classes name.
func (n *node) registry(p provider.Provider) *provider.Registry {
	r := &provider.Registry{}
	_ = r.Register(n.classes[testNS+"/db"].Provider, p)
	return r
}

// manager starts a manager on store with the node's classes.
func (n *node) manager(store Store, p provider.Provider, o Options) *Manager {
	o.Store, o.Providers, o.Classes = store, n.registry(p), n.classes
	if o.Clock == nil && n.tier == "memory" {
		o.Clock = n.clk // the ledger's clock
	}
	if o.Sockets == nil {
		o.Sockets = &openSockets{}
	}
	if o.RotationGrace == 0 {
		o.RotationGrace = -1 // these tests want a rotated-out lease revoked at once
	}
	return New(o)
}

// openSockets stands in for pkg/leaseapi (which imports this package):
// it remembers which volumes' sockets are open.
type openSockets struct {
	mu   sync.Mutex
	open map[string]bool
}

func (s *openSockets) Open(id string, _ int) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.open == nil {
		s.open = map[string]bool{}
	}
	s.open[id] = true
	return nil
}

func (s *openSockets) Close(id string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.open, id)
}

// volume is the publish request of pod name's volume, as kubelet sends it.
func (n *node) volume(name string) Volume {
	uid := "uid-" + name
	dir := filepath.Join(n.root, "pods", uid, "volumes", "kubernetes.io~csi", "db")
	if err := os.MkdirAll(dir, 0o750); err != nil {
		n.t.Fatal(err)
	}
	return Volume{
		ID: "csi-" + name, TargetPath: filepath.Join(dir, "mount"), GID: -1,
		Attributes: map[string]string{spc.ClassKey: "db"},
		Mount: spc.Mount{Class: "db", Pod: provider.Pod{
			Namespace: testNS, Name: name, UID: uid, ServiceAccount: "app",
		}},
	}
}

// alive lists the credentials of this node's pods that exist in the backend.
func (n *node) alive(ctx context.Context) map[string]bool {
	n.t.Helper()
	out, err := n.backend.alive(ctx)
	if err != nil {
		n.t.Fatalf("listing the backend's credentials: %v", err)
	}
	return out
}

// credential names a lease's credential as alive lists it.
func (n *node) credential(leaseID string) string { return n.backend.credential(leaseID) }

// podCredentials counts the credentials of pod name alive in the
// backend: those of its lease IDs (state.NewLeaseID: namespace, pod, a random
// tail).
func (n *node) podCredentials(name string) int {
	prefix := n.credential(testNS + "-" + name + "-")
	c := 0
	for cred := range n.alive(context.Background()) {
		if strings.HasPrefix(cred, prefix) {
			c++
		}
	}
	return c
}

// login reports whether the credential in dir's files (a target, or a
// task's directory in it) logs in.
func (n *node) login(ctx context.Context, dir string) error {
	user, err := n.files.readFile(filepath.Join(dir, "username"))
	if err != nil {
		return err
	}
	pass, err := n.files.readFile(filepath.Join(dir, "password"))
	if err != nil {
		return err
	}
	return n.backend.login(ctx, string(user), string(pass))
}

// names lists what a pod sees at the root of its volume.
func (n *node) names(target string) []string {
	n.t.Helper()
	out, err := n.files.readDir(target)
	if err != nil {
		n.t.Fatal(err)
	}
	return out
}
