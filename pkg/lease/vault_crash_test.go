package lease_test

import (
	"context"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	api "github.com/openbao/openbao/api/v2"
	"golang.org/x/sys/unix"

	"github.com/ephemeral-secrets/csi-driver/pkg/lease"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider/vault"
	"github.com/ephemeral-secrets/csi-driver/pkg/spc"
	"github.com/ephemeral-secrets/csi-driver/pkg/storage"
	"github.com/ephemeral-secrets/csi-driver/test/crashstore"
	"github.com/ephemeral-secrets/csi-driver/test/vaulttest"
)

// A publish that a crash stopped after its lease was recorded is revoked
// with everything the record holds: for Vault, the login token (which
// takes the database role it read with it). Before, recovery queued the
// lease by ID alone, Vault could not revoke that, and the record with the
// token was deleted.
func TestCrashedVaultPublishRevokesItsToken(t *testing.T) {
	if _, err := vaulttest.Binary(); err != nil {
		t.Skipf("no Vault server binary (make vault): %v", err)
	}
	ctx := context.Background()
	pg := lease.NeedPostgres(t)
	v, err := vaulttest.Start()
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	if err := pg.Exec(ctx, `CREATE TABLE IF NOT EXISTS public.items (id int)`); err != nil {
		t.Fatal(err)
	}
	if err := v.Setup(ctx, pg.AdminURL(), "team-a", "app", time.Hour, 2*time.Hour); err != nil {
		t.Fatal(err)
	}
	vp, err := vault.New(vault.Config{Addresses: []string{v.Addr}})
	if err != nil {
		t.Fatal(err)
	}
	reg := &provider.Registry{}
	_ = reg.Register(vault.Name, vp)
	classes := lease.ClassMap{"team-a/db": {Namespace: "team-a", Name: "db", Provider: vault.Name, Parameters: map[string]string{
		"vaultAddress": v.Addr, "roleName": "app", "vaultAuthMountPath": "jwt",
		"objects": "- objectName: username\n  secretPath: database/creds/app\n  secretKey: username\n" +
			"- objectName: password\n  secretPath: database/creds/app\n  secretKey: password\n",
	}}}
	root := t.TempDir()
	store, err := storage.Open(filepath.Join(root, "state"), storage.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = unix.Unmount(store.Root(), unix.MNT_DETACH) }()
	jwt, err := v.Token("team-a", "app", "vault")
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(root, "pods", "uid-1", "volumes", "kubernetes.io~csi", "db")
	if err := os.MkdirAll(dir, 0o750); err != nil {
		t.Fatal(err)
	}
	vol := lease.Volume{
		ID: "csi-vault", TargetPath: filepath.Join(dir, "mount"), GID: -1,
		Attributes: map[string]string{spc.ClassKey: "db"},
		Mount: spc.Mount{Class: "db", Pod: provider.Pod{Namespace: "team-a", Name: "p", UID: "uid-1", ServiceAccount: "app"},
			Tokens: map[string]provider.Token{"vault": {Token: jwt}}},
	}
	rootClient, err := v.Client()
	if err != nil {
		t.Fatal(err)
	}
	// restart recovers a new manager from the store as it is.
	restart := func() *lease.Manager {
		m := lease.New(lease.Options{Store: store, Providers: reg, Classes: classes})
		if err := m.Recover(ctx); err != nil {
			t.Fatal(err)
		}
		return m
	}
	unpublishAndDrain := func(m *lease.Manager) {
		if err := m.Unpublish(ctx, vol.ID, vol.TargetPath); err != nil {
			t.Fatal(err)
		}
		drain(t, m)
	}
	tokensChecked := 0
	for k := 1; k < 20; k++ {
		cs := crashstore.New(store)
		m := lease.New(lease.Options{Store: cs, Providers: reg, Classes: classes})
		if err := m.Recover(ctx); err != nil {
			t.Fatal(err)
		}
		cs.Arm(k)
		after := crashstore.Run(func() { _ = m.Publish(ctx, vol) })
		m.Close()
		if after == "" {
			// Published without a crash: the end of the enumeration.
			unpublishAndDrain(restart())
			break
		}
		records, err := store.ListLeases(vol.ID)
		if err != nil {
			t.Fatal(err)
		}
		m2 := restart()
		// The publish finished before the crash if recovery resumed the
		// volume: its lease must live on, and die at unpublish.
		resumed, _ := store.ReadLease(vol.ID)
		drain(t, m2)
		for _, l := range records {
			if l.ID == resumed.ID {
				if !tokenAlive(t, rootClient, l) {
					t.Errorf("after write %d (%s): the resumed volume's token was revoked", k, after)
				}
				continue
			}
			tokensChecked++
			if tokenAlive(t, rootClient, l) {
				t.Errorf("after write %d (%s): the recorded Vault token is still alive after recovery", k, after)
			}
		}
		if resumed.ID != "" {
			unpublishAndDrain(restart())
			if tokenAlive(t, rootClient, resumed) {
				t.Errorf("after write %d (%s): the token outlived the unpublish", k, after)
			}
		}
	}
	if tokensChecked == 0 {
		t.Fatal("no crash point left a recorded token: the test checks nothing")
	}
}

// tokenAlive reports whether the Vault token l's record holds is alive.
func tokenAlive(t *testing.T, root *api.Client, l provider.Lease) bool {
	t.Helper()
	tok := l.Handle["token"]
	if tok == "" {
		t.Fatalf("lease %s recorded without its token", l.ID)
	}
	_, err := root.Auth().Token().LookupWithContext(context.Background(), tok)
	var re *api.ResponseError
	switch {
	case err == nil:
		return true
	case errors.As(err, &re) && (re.StatusCode == http.StatusForbidden || re.StatusCode == http.StatusBadRequest):
		return false
	}
	t.Fatalf("looking up a token: %v", err)
	return false
}

// drain runs m's revocation worker until its queue is empty.
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
