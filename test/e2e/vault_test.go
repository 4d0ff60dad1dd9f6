package e2e

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/lease"
	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/kubelet"
	"github.com/ephemeral-secrets/csi-driver/test/vaulttest"
)

var (
	vaultOnce sync.Once
	vaultSrv  *vaulttest.Server
	vaultErr  error
)

// startVault starts the suite's Vault dev server once, set up with a
// database role of 8 s TTL and 20 s max TTL on the suite's PostgreSQL.
func startVault(t *testing.T) *vaulttest.Server {
	t.Helper()
	vaultOnce.Do(func() {
		if vaultSrv, vaultErr = vaulttest.Start(); vaultErr != nil {
			return
		}
		harness.RegisterLog(vaultSrv.LogFile)
		vaultErr = vaultSrv.Setup(context.Background(), pg.AdminURL(), "team-a", "app", 8*time.Second, 20*time.Second)
	})
	if vaultErr != nil {
		t.Fatal(vaultErr)
	}
	return vaultSrv
}

// vaultClasses are shaped like hashicorp/vault-csi-provider's documented
// examples (database and KV), with this server's address, roles and paths.
func vaultClasses(addr string) string {
	return fmt.Sprintf(`apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: vault-database
  namespace: team-a
spec:
  provider: vault
  parameters:
    vaultAddress: "%[1]s"
    roleName: "app"
    vaultAuthMountPath: "jwt"
    objects: |
      - objectName: "db-username"
        secretPath: "database/creds/app"
        secretKey: "username"
      - objectName: "db-password"
        secretPath: "database/creds/app"
        secretKey: "password"
---
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: vault-kv
  namespace: team-a
spec:
  provider: vault
  parameters:
    vaultAddress: "%[1]s"
    roleName: "app"
    vaultAuthMountPath: "jwt"
    objects: |
      - objectName: "api-key"
        secretPath: "secret/data/app"
        secretKey: "api-key"
      - objectName: "all"
        secretPath: "secret/data/app"
---
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: vault-elsewhere
  namespace: team-a
spec:
  provider: vault
  parameters:
    vaultAddress: "https://attacker.example:8200"
    roleName: "app"
    objects: |
      - objectName: "x"
        secretPath: "secret/data/app"
`, addr)
}

func setupVault(t *testing.T) (*fixture, *vaulttest.Server) {
	t.Helper()
	v := startVault(t)
	f := startFixture(t, vaultClasses(v.Addr), "vault:\n  addresses: [\""+v.Addr+"\"]\n", "--backend-timeout", "3s")
	return f, v
}

// vaultPod is a pod of team-a/app with a token the Vault server's jwt auth trusts.
func vaultPod(t *testing.T, v *vaulttest.Server, name string) kubelet.Pod {
	t.Helper()
	return vaultPodAs(t, v, name, "app")
}

// vaultPodAs is a pod of team-a running as service account sa, with a
// token signed by the key the Vault server trusts.
func vaultPodAs(t *testing.T, v *vaulttest.Server, name, sa string) kubelet.Pod {
	t.Helper()
	p := kubelet.NewPod("team-a", name, sa)
	tok, err := v.Token("team-a", sa, "vault")
	if err != nil {
		t.Fatal(err)
	}
	harness.RememberSecret(tok)
	p.Tokens = map[string]string{"vault": tok}
	return p
}

func TestVaultDatabaseLeaseIsRenewedRotatedAndRevoked(t *testing.T) {
	ctx := context.Background()
	f, v := setupVault(t)
	pod := vaultPod(t, v, "vault-db")
	vol := dbVolume("vault-database")
	target, err := f.kube.Publish(ctx, pod, vol)
	if err != nil {
		t.Fatalf("publish: %v", err)
	}
	user := readFile(t, target, "db-username")
	password := readSecret(t, target, "db-password")
	conn, err := login(ctx, user, password)
	if err != nil {
		t.Fatalf("login with the Vault-issued user: %v", err)
	}
	conn.Close(ctx)
	// Republishes mint nothing: still one user.
	for range 3 {
		if _, err := f.kube.Publish(ctx, pod, vol); err != nil {
			t.Fatalf("republish: %v", err)
		}
	}
	// Vault names users v-<display name>-<role>-<random>-<time>.
	parts := strings.Split(user, "-")
	prefix := strings.Join(parts[:len(parts)-2], "-")
	if n, _ := pg.CountRoles(ctx, prefix); n != 1 {
		t.Errorf("%d Vault users after republishes, want 1", n)
	}
	// The lease is renewed: the same user's VALID UNTIL moves.
	first, err := pg.ValidUntil(ctx, user)
	if err != nil {
		t.Fatal(err)
	}
	harness.Eventually(t, 12*time.Second, "lease renewed (VALID UNTIL extended)", func() (bool, error) {
		v, err := pg.ValidUntil(ctx, user)
		return v.After(first), err
	})
	if got := readFile(t, target, "db-username"); got != user {
		t.Fatalf("renewal replaced the user; want the same lease extended")
	}
	// At max TTL a new user is read, swapped in, and the old one dropped.
	var next string
	harness.Eventually(t, 25*time.Second, "rotation at max TTL", func() (bool, error) {
		next = readFile(t, target, "db-username")
		return next != user, nil
	})
	readSecret(t, target, "db-password")
	harness.Eventually(t, 10*time.Second, "old user dropped", roleGone(ctx, user))
	// The volume's Vault token, from the driver's tmpfs state.
	store, err := storageOf(f)
	if err != nil {
		t.Fatal(err)
	}
	l, err := lease.NewStateRecords(store).ReadLease(kubelet.VolumeID(pod, "db"))
	if err != nil {
		t.Fatal(err)
	}
	token := l.Handle["token"]
	harness.RememberSecret(token)
	root, err := v.Client()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := root.Logical().Write("auth/token/lookup", map[string]any{"token": token}); err != nil {
		t.Fatalf("the volume's token is not valid while published: %v", err)
	}
	if err := f.kube.Unpublish(ctx, pod, "db"); err != nil {
		t.Fatal(err)
	}
	harness.Eventually(t, 10*time.Second, "user dropped after unpublish", roleGone(ctx, next))
	harness.Eventually(t, 10*time.Second, "token revoked", func() (bool, error) {
		_, err := root.Logical().Write("auth/token/lookup", map[string]any{"token": token})
		return err != nil, nil
	})
	if strings.Contains(strings.Join(auditRecords(t, f.audit), " "), "revoke/success") == false {
		t.Errorf("no revoke success in the audit trail")
	}
}

func TestVaultKVClassMounts(t *testing.T) {
	ctx := context.Background()
	f, v := setupVault(t)
	pod := vaultPod(t, v, "vault-kv")
	target, err := f.kube.Publish(ctx, pod, dbVolume("vault-kv"))
	if err != nil {
		t.Fatalf("publish: %v", err)
	}
	key := readSecret(t, target, "api-key")
	if !strings.HasPrefix(key, "kv-api-key-") {
		t.Errorf("api-key file holds %q", key)
	}
	all := readSecret(t, target, "all")
	if !strings.Contains(all, key) || !strings.Contains(all, "eu-west-1") {
		t.Errorf("the whole-secret object lacks the data: %q", all)
	}
	if err := f.kube.Unpublish(ctx, pod, "db"); err != nil {
		t.Fatal(err)
	}
	// A class may not send the pod's token to a server the admin did not list.
	other := vaultPod(t, v, "vault-elsewhere")
	if _, err := f.kube.Publish(ctx, other, dbVolume("vault-elsewhere")); err == nil || !strings.Contains(err.Error(), "PermissionDenied") {
		t.Errorf("a class naming another Vault: %v, want PermissionDenied", err)
	}
	// A token for another identity is refused by Vault, with its reason.
	intruder := vaultPodAs(t, v, "intruder", "other")
	if _, err := f.kube.Publish(ctx, intruder, dbVolume("vault-kv")); err == nil || !strings.Contains(err.Error(), "PermissionDenied") {
		t.Errorf("another service account: %v, want PermissionDenied", err)
	}
}

func TestVaultOutageAndCrashStillRevoke(t *testing.T) {
	ctx := context.Background()
	f, v := setupVault(t)
	pod := vaultPod(t, v, "vault-crash")
	target, err := f.kube.Publish(ctx, pod, dbVolume("vault-database"))
	if err != nil {
		t.Fatalf("publish: %v", err)
	}
	user := readFile(t, target, "db-username")
	readSecret(t, target, "db-password")

	if err := v.Pause(); err != nil { // Vault stops answering...
		t.Fatal(err)
	}
	start := time.Now()
	err = f.kube.Unpublish(ctx, pod, "db")
	took := time.Since(start)
	f.driver.Kill() // ...and the driver dies before the revocation got through.
	if err != nil {
		_ = v.Resume()
		t.Fatalf("unpublish during the outage: %v", err)
	}
	if took > 2*time.Second {
		t.Errorf("unpublish waited on Vault (%s)", took)
	}
	if exists, _ := pg.RoleExists(ctx, user); !exists {
		_ = v.Resume()
		t.Fatal("the user vanished during the outage: the test proves nothing")
	}
	// The driver comes back first, still facing the outage; then Vault does.
	if err := f.driver.Start(ctx); err != nil {
		_ = v.Resume()
		t.Fatal(err)
	}
	if err := v.Resume(); err != nil {
		t.Fatal(err)
	}
	harness.Eventually(t, 15*time.Second, "user dropped once driver and Vault are back", roleGone(ctx, user))
}
