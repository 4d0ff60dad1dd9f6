package lease_test

import (
	"context"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	api "github.com/openbao/openbao/api/v2"
	"golang.org/x/sys/unix"

	"github.com/ephemeral-secrets/csi-driver/pkg/lease"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider/vault"
	"github.com/ephemeral-secrets/csi-driver/pkg/spc"
	"github.com/ephemeral-secrets/csi-driver/pkg/storage"
	"github.com/ephemeral-secrets/csi-driver/test/faults"
	"github.com/ephemeral-secrets/csi-driver/test/pgtest"
	"github.com/ephemeral-secrets/csi-driver/test/vaulttest"
)

// vaultEnv is a node whose volumes come from a real Vault dev server,
// whose database engine mints roles in the package's real PostgreSQL.
type vaultEnv struct {
	t       *testing.T
	pg      *pgtest.Server
	vault   *vaulttest.Server
	root    *api.Client
	fs      *storage.Filesystem // the raw store
	store   lease.Store         // fs, as the manager reads it
	fp      *faults.Provider    // the vault provider, faults injectable
	classes lease.ClassMap
	vol     lease.Volume
}

// newVaultEnv starts Vault with database leases of ttl (up to maxTTL).
func newVaultEnv(t *testing.T, ttl, maxTTL time.Duration) *vaultEnv {
	t.Helper()
	if _, err := vaulttest.Binary(); err != nil {
		t.Skipf("no Vault server binary (make vault): %v", err)
	}
	ctx := context.Background()
	e := &vaultEnv{t: t, pg: lease.NeedPostgres(t)}
	var err error
	if e.vault, err = vaulttest.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.vault.Close)
	if err := e.pg.Exec(ctx, `CREATE TABLE IF NOT EXISTS public.items (id int)`); err != nil {
		t.Fatal(err)
	}
	if err := e.vault.Setup(ctx, e.pg.AdminURL(), "team-a", "app", ttl, maxTTL); err != nil {
		t.Fatal(err)
	}
	if e.root, err = e.vault.Client(); err != nil {
		t.Fatal(err)
	}
	vp, err := vault.New(vault.Config{Addresses: []string{e.vault.Addr}})
	if err != nil {
		t.Fatal(err)
	}
	e.fp = &faults.Provider{Provider: vp}
	e.classes = lease.ClassMap{"team-a/db": {Namespace: "team-a", Name: "db", Provider: vault.Name, Parameters: map[string]string{
		"vaultAddress": e.vault.Addr, "roleName": "app", "vaultAuthMountPath": "jwt",
		"objects": "- objectName: username\n  secretPath: database/creds/app\n  secretKey: username\n" +
			"- objectName: password\n  secretPath: database/creds/app\n  secretKey: password\n",
	}}}
	dir := t.TempDir()
	if e.fs, err = storage.Open(filepath.Join(dir, "state"), storage.Options{}); err != nil {
		t.Fatal(err)
	}
	e.store = lease.NewStore(e.fs)
	jwt, err := e.vault.Token("team-a", "app", "vault")
	if err != nil {
		t.Fatal(err)
	}
	pods := filepath.Join(dir, "pods", "uid-1", "volumes", "kubernetes.io~csi", "db")
	if err := os.MkdirAll(pods, 0o750); err != nil {
		t.Fatal(err)
	}
	e.vol = lease.Volume{
		ID: "csi-vault", TargetPath: filepath.Join(pods, "mount"), GID: -1,
		Attributes: map[string]string{spc.ClassKey: "db"},
		Mount: spc.Mount{Class: "db", Pod: provider.Pod{Namespace: "team-a", Name: "p", UID: "uid-1", ServiceAccount: "app"},
			Tokens: map[string]provider.Token{"vault": {Token: jwt}}},
	}
	t.Cleanup(func() {
		_ = e.store.UnmountTarget(e.vol.TargetPath)
		_ = e.store.DeleteVolume(e.vol.ID)
		_ = unix.Unmount(e.fs.Root(), unix.MNT_DETACH)
	})
	return e
}

// manager makes a manager of the env's provider and classes; o.Store
// defaults to the env's store.
func (e *vaultEnv) manager(o lease.Options) *lease.Manager {
	if o.Store == nil {
		o.Store = e.store
	}
	reg := &provider.Registry{}
	_ = reg.Register(vault.Name, e.fp)
	o.Providers, o.Classes = reg, e.classes
	return lease.New(o)
}

// restart recovers a new manager from the store as it is.
func (e *vaultEnv) restart(o lease.Options) *lease.Manager {
	e.t.Helper()
	m := e.manager(o)
	if err := m.Recover(context.Background()); err != nil {
		e.t.Fatal(err)
	}
	return m
}

func (e *vaultEnv) unpublishAndDrain(m *lease.Manager) {
	e.t.Helper()
	if err := m.Unpublish(context.Background(), e.vol.ID, e.vol.TargetPath); err != nil {
		e.t.Fatal(err)
	}
	drain(e.t, m)
}

// tokenAlive reports whether the Vault token l's record holds is alive.
func (e *vaultEnv) tokenAlive(l provider.Lease) bool {
	e.t.Helper()
	tok := l.Handle["token"]
	if tok == "" {
		e.t.Fatalf("lease %s recorded without its token", l.ID)
	}
	_, err := e.root.Auth().Token().LookupWithContext(context.Background(), tok)
	var re *api.ResponseError
	switch {
	case err == nil:
		return true
	case errors.As(err, &re) && (re.StatusCode == http.StatusForbidden || re.StatusCode == http.StatusBadRequest):
		return false
	}
	e.t.Fatalf("looking up a token: %v", err)
	return false
}

// appTokens counts the live tokens of the "app" policy: the pods' logins.
func (e *vaultEnv) appTokens() int {
	e.t.Helper()
	ctx := context.Background()
	s, err := e.root.Logical().ListWithContext(ctx, "auth/token/accessors")
	if err != nil || s == nil {
		e.t.Fatalf("listing tokens: %v", err)
	}
	keys, _ := s.Data["keys"].([]any)
	n := 0
	for _, k := range keys {
		acc, _ := k.(string)
		l, err := e.root.Auth().Token().LookupAccessorWithContext(ctx, acc)
		if err != nil || l == nil {
			continue // revoked meanwhile
		}
		if ps, err := l.TokenPolicies(); err == nil && slices.Contains(ps, "app") {
			n++
		}
	}
	return n
}

// login checks that the credential in the volume's files logs in.
func (e *vaultEnv) login() error {
	user, err := os.ReadFile(filepath.Join(e.vol.TargetPath, "username"))
	if err != nil {
		return err
	}
	pass, err := os.ReadFile(filepath.Join(e.vol.TargetPath, "password"))
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, e.pg.URL(string(user), string(pass)))
	if err != nil {
		return err
	}
	return conn.Close(ctx)
}

// drain runs m's revocation worker until its queue is empty, then stops m.
func drain(t *testing.T, m *lease.Manager) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go m.Run(ctx)
	defer m.Close()
	for end := time.Now().Add(15 * time.Second); m.QueueLength() > 0; time.Sleep(50 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatalf("revocation queue not drained: %d left", m.QueueLength())
		}
	}
}
