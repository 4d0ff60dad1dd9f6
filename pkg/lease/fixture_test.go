package lease

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"golang.org/x/sys/unix"

	"github.com/ephemeral-secrets/csi-driver/pkg/issuer"
	pgengine "github.com/ephemeral-secrets/csi-driver/pkg/issuer/postgres"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider/postgres"
	"github.com/ephemeral-secrets/csi-driver/pkg/render"
	"github.com/ephemeral-secrets/csi-driver/pkg/spc"
	"github.com/ephemeral-secrets/csi-driver/pkg/storage"
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

// node is one test node: a real tmpfs store, the real postgres provider
// against the shared server, and kubelet's pod directories.
type node struct {
	t       testing.TB
	root    string
	fs      *storage.Filesystem // the raw store
	store   Store               // fs, as the manager reads it
	pg      *postgres.Provider
	classes classMap
	prefix  string // role-name prefix of this test's pods
}

const testNS = "crash"

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
	p := postgres.NewNode(iss.Local())
	n := &node{
		t: t, root: root, fs: store, store: NewStore(store), pg: p,
		classes: classMap{
			testNS + "/db": {Namespace: testNS, Name: "db", Provider: postgres.Name,
				Parameters: map[string]string{postgres.ConnectionParam: "main", postgres.RoleParam: "app"}},
			testNS + "/db-tasks": {Namespace: testNS, Name: "db-tasks", Provider: postgres.Name,
				Parameters: map[string]string{postgres.ConnectionParam: "main", postgres.RoleParam: "app", render.LeaseAPIParam: "true"}},
		},
		prefix: "esc_" + testNS + "_",
	}
	t.Cleanup(func() {
		iss.Close()
		unmountUnder(filepath.Join(root, "pods"))
		entries, _ := os.ReadDir(filepath.Join(store.Root(), "volumes"))
		for _, e := range entries {
			_ = unix.Unmount(filepath.Join(store.Root(), "volumes", e.Name(), "fs"), unix.MNT_DETACH)
		}
		_ = unix.Unmount(store.Root(), unix.MNT_DETACH)
		dropRoles(srv, n.prefix)
	})
	return n
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

// registry registers p as the postgres provider.
func registry(p provider.Provider) *provider.Registry {
	r := &provider.Registry{}
	_ = r.Register(postgres.Name, p)
	return r
}

// manager starts a manager on store with the node's classes.
func (n *node) manager(store Store, p provider.Provider, o Options) *Manager {
	o.Store, o.Providers, o.Classes = store, registry(p), n.classes
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

// alive lists the roles of this node's pods that exist in PostgreSQL.
func (n *node) alive(ctx context.Context) map[string]bool {
	n.t.Helper()
	conn, err := pgx.Connect(ctx, pg.AdminURL())
	if err != nil {
		n.t.Fatal(err)
	}
	defer conn.Close(ctx)
	rows, err := conn.Query(ctx, `SELECT rolname FROM pg_roles WHERE rolname LIKE $1`, n.prefix+"%")
	if err != nil {
		n.t.Fatal(err)
	}
	names, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		n.t.Fatal(err)
	}
	out := map[string]bool{}
	for _, name := range names {
		out[name] = true
	}
	return out
}

// login reports whether the credential in target's files logs in.
func login(ctx context.Context, target string) error {
	user, err := os.ReadFile(filepath.Join(target, "username"))
	if err != nil {
		return err
	}
	pass, err := os.ReadFile(filepath.Join(target, "password"))
	if err != nil {
		return err
	}
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	conn, err := pgx.Connect(cctx, pg.URL(string(user), string(pass)))
	if err != nil {
		return fmt.Errorf("login as %s: %w", user, err)
	}
	return conn.Close(ctx)
}
