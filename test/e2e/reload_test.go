package e2e

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/status"

	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/kubelet"
)

// writeLikeKubelet writes the backend file as kubelet updates a Secret.
func writeLikeKubelet(t *testing.T, dir, content string) string {
	t.Helper()
	path, err := harness.WriteLikeKubelet(dir, "backends.yaml", content)
	if err != nil {
		t.Fatal(err)
	}
	return path
}

// TestBackendConfigReloadsWithoutRestart rotates the admin password in
// PostgreSQL and in the backend file (as kubelet updates a Secret), and
// checks the running driver uses the new one; then a broken file, which
// must leave the configuration in use as it is, and its content out of
// the logs.
func TestBackendConfigReloadsWithoutRestart(t *testing.T) {
	ctx := context.Background()
	suffix := strconv.Itoa(os.Getpid())
	oldPassword, newPassword, brokenPassword := "reload-old-"+suffix, "reload-new-"+suffix, "reload-broken-"+suffix
	for _, s := range []string{oldPassword, newPassword, brokenPassword} {
		harness.RememberSecret(s)
	}
	if err := pg.Exec(ctx, fmt.Sprintf(`CREATE ROLE reload_admin LOGIN SUPERUSER PASSWORD '%s'`, oldPassword)); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pg.Exec(context.Background(), `DROP ROLE IF EXISTS reload_admin`) }) // after the driver stops
	config := func(password string) string {
		return strings.Replace(backends("1h", "2h"), pg.AdminURL(), pg.URL("reload_admin", password), 1)
	}
	dir := t.TempDir()
	path := writeLikeKubelet(t, dir, config(oldPassword))
	f := startFixture(t, classes, config(oldPassword), "--backend-config", path, "--backend-reload-interval", "100ms")

	metric := func(want string) {
		t.Helper()
		harness.Eventually(t, 10*time.Second, want, func() (bool, error) {
			_, body, err := f.driver.Scrape("/metrics")
			return strings.Contains(body, "\n"+want+"\n"), err
		})
	}
	var roles []string
	publish := func(name string) kubelet.Pod {
		t.Helper()
		pod := newPod(name, "app")
		target, err := f.kube.Publish(ctx, pod, dbVolume("app-db"))
		if err != nil {
			t.Fatalf("publish %s: %v", name, err)
		}
		user := readFile(t, target, "username")
		roles = append(roles, user)
		conn, err := login(ctx, user, readSecret(t, target, "password"))
		if err != nil {
			t.Fatalf("%s: the issued role cannot log in: %v", name, err)
		}
		conn.Close(ctx)
		return pod
	}
	metric("ephemeral_secrets_backend_config_generation 1")
	before := publish("before-rotation")

	// The admin rotates the password and ends the sessions of the old one:
	// the driver's open connections are gone, the old password refused.
	if err := pg.Exec(ctx, fmt.Sprintf(`ALTER ROLE reload_admin PASSWORD '%s'`, newPassword),
		`SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'reload_admin'`); err != nil {
		t.Fatal(err)
	}
	stale := newPod("stale", "app")
	if _, err := f.kube.Publish(ctx, stale, dbVolume("app-db")); err == nil {
		t.Fatalf("publish with the old admin password succeeded; the test proves nothing")
	} else {
		t.Logf("with the old password: %s", status.Code(err))
	}
	if err := f.kube.Unpublish(ctx, stale, "db"); err != nil {
		t.Fatal(err)
	}

	writeLikeKubelet(t, dir, config(newPassword))
	metric("ephemeral_secrets_backend_config_generation 2")
	after := publish("after-rotation")

	// A broken file (with a password in it) keeps generation 2.
	broken := config(brokenPassword) + "  tpyo: true\n"
	writeLikeKubelet(t, dir, broken)
	metric("ephemeral_secrets_backend_config_reload_errors_total 1")
	metric("ephemeral_secrets_backend_config_generation 2")
	kept := publish("after-broken-file")

	// The Secret fixed (the same content as generation 2, in a new
	// directory, as when only another key changed) is loaded.
	writeLikeKubelet(t, dir, config(newPassword))
	metric("ephemeral_secrets_backend_config_generation 3")
	fixed := publish("after-fix")

	// Leases of both generations are revoked by the providers in use.
	for _, p := range []kubelet.Pod{before, after, kept, fixed} {
		if err := f.kube.Unpublish(ctx, p, "db"); err != nil {
			t.Fatalf("unpublish %s: %v", p.Name, err)
		}
	}
	for _, role := range roles {
		harness.Eventually(t, 10*time.Second, "role "+role+" dropped", roleGone(ctx, role))
	}

	audit, err := os.ReadFile(f.audit)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		`"stage":"config","volume_id":"","pod":{"namespace":"","name":"","uid":"","serviceAccount":""},"outcome":"success","detail":"generation 1"`,
		`"outcome":"success","detail":"generation 2"`,
		`"outcome":"error","error":"backend config ` + path + `: not valid (check its keys and indentation)","detail":"generation 2 stays in use"`,
		`"outcome":"success","detail":"generation 3"`,
	} {
		if !strings.Contains(string(audit), want) {
			t.Errorf("audit log lacks %s", want)
		}
	}
	log, err := os.ReadFile(f.driver.LogFile)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(log), "Backend configuration changed but does not load") {
		t.Errorf("the driver's log does not say the new file was refused")
	}
	if strings.Contains(string(log), "tpyo") {
		t.Errorf("the driver's log quotes the backend file")
	}
}
