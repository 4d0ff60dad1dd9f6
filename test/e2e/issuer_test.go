package e2e

import (
	"context"
	"os"
	"regexp"
	"testing"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/issuer"
	pgengine "github.com/ephemeral-secrets/csi-driver/pkg/issuer/postgres"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider/postgres"
	"github.com/ephemeral-secrets/csi-driver/test/harness"
)

// A node rebooted: the driver dies with its tmpfs state, kubelet's pods
// are gone, and nothing on the node remembers the roles it had. The
// driver that starts on the wiped state directory runs the in-process
// issuer, whose reaper drops the roles it tagged once their VALID UNTIL
// passed and ends the sessions still open with them, within TTL + reap
// interval. It never touches a role still valid, nor one it did not tag.
func TestRebootOnWipedStateReapsExpiredRolesAndTheirSessions(t *testing.T) {
	ctx := context.Background()
	const ttl, reap = 6 * time.Second, 2 * time.Second
	f := setup(t, ttl.String(), "1h", "--reap-interval", reap.String())
	pod := newPod("rebooted", "app")
	target, err := f.kube.Publish(ctx, pod, dbVolume("short-lived"))
	if err != nil {
		t.Fatalf("publish: %v", err)
	}
	user := readFile(t, target, "username")
	password := readSecret(t, target, "password")
	held, err := login(ctx, user, password)
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close(ctx)

	// A role the driver tagged that is still valid: another node's,
	// minted by another authority over the same database.
	other, err := issuer.New(issuer.Options{Config: pgengine.Config{Connections: map[string]*pgengine.Connection{"main": {
		URL: pg.AdminURL(), Roles: map[string]*pgengine.Role{"rotating": {
			DefaultTTL: pgengine.Duration{Duration: time.Hour}, MaxTTL: pgengine.Duration{Duration: time.Hour},
			CreationStatements: []string{`CREATE ROLE "{{.Name}}" LOGIN PASSWORD '{{.Password}}' VALID UNTIL '{{.Expiration}}'`},
			Allowed:            []pgengine.Subject{{Namespace: "*", ServiceAccount: "*"}},
		}},
	}}}})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	node := postgres.NewNode(other.Local())
	params := map[string]string{postgres.ConnectionParam: "main", postgres.RoleParam: "rotating"}
	valid, err := node.Issue(ctx, provider.Request{LeaseID: "team-a-elsewhere-valid001", Class: "team-a/short-lived",
		Params: params, Pod: provider.Pod{Namespace: "team-a", Name: "elsewhere", UID: "u-elsewhere", ServiceAccount: "app"}})
	if err != nil {
		t.Fatal(err)
	}
	harness.RememberSecret(valid.Values["password"])
	defer func() { _ = node.Revoke(ctx, provider.Lease{ID: "team-a-elsewhere-valid001", Params: params}) }()
	// A role the driver did not make, expired long ago, named like ours.
	untagged := postgres.RoleName("team-a-notours-expired1")
	if err := pg.Exec(ctx, `CREATE ROLE `+untagged+` LOGIN VALID UNTIL '2000-01-01'`); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = pg.Exec(ctx, `DROP ROLE IF EXISTS `+untagged) }()

	// The reboot: the driver dies, its state and kubelet's mounts go.
	f.driver.Kill()
	killed := time.Now()
	harness.UnmountUnder(f.env.StateDir)
	harness.UnmountUnder(f.env.KubeletDir)
	if err := os.RemoveAll(f.env.StateDir); err != nil {
		t.Fatal(err)
	}
	if err := f.kube.RemovePod(pod); err != nil {
		t.Fatal(err)
	}
	if err := f.driver.Start(ctx); err != nil {
		t.Fatalf("start on the wiped state: %v", err)
	}
	harness.Eventually(t, ttl+reap+5*time.Second, "the expired role dropped by the reaper", roleGone(ctx, user))
	if _, err := held.Exec(ctx, `SELECT 1`); err == nil {
		t.Error("the session held with the reaped role still runs")
	}
	t.Logf("role gone %.1fs after the kill (TTL %s + reap interval %s)", time.Since(killed).Seconds(), ttl, reap)
	_, body, err := f.driver.Scrape("/metrics")
	if err != nil {
		t.Fatal(err)
	}
	if !regexp.MustCompile(`(?m)^ephemeral_secrets_issuer_reaped_roles_total\{reason="expired"\} [1-9]`).MatchString(body) {
		t.Error("the reaped role is not counted in ephemeral_secrets_issuer_reaped_roles_total")
	}
	// Other passes have run meanwhile; both roles are still there.
	time.Sleep(2 * reap)
	for _, name := range []string{valid.Values["username"], untagged} {
		if ok, err := pg.RoleExists(ctx, name); err != nil || !ok {
			t.Errorf("role %s touched by the reaper (exists %v, %v)", name, ok, err)
		}
	}
	if conn, err := login(ctx, valid.Values["username"], valid.Values["password"]); err != nil {
		t.Errorf("the valid role cannot log in: %v", err)
	} else {
		conn.Close(ctx)
	}
}
