package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/ephemeral-secrets/csi-driver/pkg/lease"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider/postgres"
	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/kubelet"
)

func dbVolume(class string) kubelet.Volume {
	return kubelet.Volume{Name: "db", Attributes: map[string]string{"secretProviderClass": class}, MountGroup: "1234", ReadOnly: true}
}

func newPod(name, sa string) kubelet.Pod {
	return withToken(kubelet.NewPod("team-a", name, sa))
}

// withToken gives the pod a service-account token, remembered as a secret.
func withToken(p kubelet.Pod) kubelet.Pod {
	p.Tokens = map[string]string{"vault": "sa-token-" + p.UID}
	harness.RememberSecret(p.Tokens["vault"])
	return p
}

// login connects as the issued role.
func login(ctx context.Context, user, password string) (*pgx.Conn, error) {
	return pgx.Connect(ctx, pg.URL(user, password))
}

func loginRefused(ctx context.Context, user, password string) (bool, error) {
	conn, err := login(ctx, user, password)
	if err == nil {
		conn.Close(ctx)
		return false, nil
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "28P01" { // invalid_password: what PostgreSQL says for a missing role too
		return true, nil
	}
	return false, err
}

func roleGone(ctx context.Context, name string) func() (bool, error) {
	return func() (bool, error) {
		ok, err := pg.RoleExists(ctx, name)
		return !ok, err
	}
}

func TestPublishServesWorkingCredentialsAndUnpublishRevokesThem(t *testing.T) {
	ctx := context.Background()
	f := setup(t, "1h", "2h")
	pod := newPod("agent-1", "app")

	target, err := f.kube.Publish(ctx, pod, dbVolume("app-db"))
	if err != nil {
		t.Fatalf("publish: %v", err)
	}
	user := readFile(t, target, "username")
	password := readSecret(t, target, "password")
	if !strings.HasPrefix(user, "esc_team_a_agent_1_") {
		t.Errorf("username %q does not say which pod it is for", user)
	}

	// Files: modes, owner root:fsGroup, symlinks through ..data.
	for name, mode := range map[string]os.FileMode{"username": 0o440, "password": 0o440, "dsn": 0o440, "pg.env": 0o440, "config/db.json": 0o400} {
		st, err := os.Stat(filepath.Join(target, name))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		sys := st.Sys().(*syscall.Stat_t)
		if st.Mode().Perm() != mode || sys.Uid != 0 || sys.Gid != 1234 {
			t.Errorf("%s: mode %o owner %d:%d, want %o 0:1234", name, st.Mode().Perm(), sys.Uid, sys.Gid, mode)
		}
	}
	if l, err := os.Readlink(filepath.Join(target, "username")); err != nil || l != "..data/username" {
		t.Errorf("username is not a link through ..data: %q %v", l, err)
	}
	var doc map[string]string
	if b, err := os.ReadFile(filepath.Join(target, "config/db.json")); err != nil || json.Unmarshal(b, &doc) != nil || doc["username"] != user {
		t.Errorf("config/db.json does not hold the username: %v", err)
	}

	// The mount: read-only, nosuid, nodev, noexec tmpfs with a size cap.
	opts, fstype, super, ok := harness.MountOptions(target)
	if !ok {
		t.Fatalf("target is not a mount point")
	}
	for _, want := range []string{"ro", "nosuid", "nodev", "noexec"} {
		if !slices.Contains(opts, want) {
			t.Errorf("mount options %v lack %s", opts, want)
		}
	}
	if fstype != "tmpfs" || !strings.Contains(super, "size=") {
		t.Errorf("mount is %s (%s), want a size-capped tmpfs", fstype, super)
	}
	if err := os.WriteFile(filepath.Join(target, "x"), []byte("x"), 0o600); !errors.Is(err, syscall.EROFS) {
		t.Errorf("writing into the volume: %v, want EROFS", err)
	}
	// As the pod sees it: the copy of the mount in kubelet's peer group.
	podView := f.env.InPodView(target)
	if opts, _, _, ok := harness.MountOptions(podView); !ok || !slices.Contains(opts, "ro") {
		t.Errorf("the pod's view %s: mounted=%v options %v, want read-only", podView, ok, opts)
	}
	if err := os.WriteFile(filepath.Join(podView, "x"), []byte("x"), 0o600); !errors.Is(err, syscall.EROFS) {
		t.Errorf("writing into the pod's view of the volume: %v, want EROFS", err)
	}

	// The credentials work for what the role grants, and only that.
	conn, err := login(ctx, user, password)
	if err != nil {
		t.Fatalf("login with issued credentials: %v", err)
	}
	var n int
	if err := conn.QueryRow(ctx, `SELECT count(*) FROM public.items`).Scan(&n); err != nil || n != 2 {
		t.Errorf("granted query: n=%d err=%v", n, err)
	}
	_, err = conn.Exec(ctx, `SELECT * FROM public.payroll`)
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "42501" {
		t.Errorf("query outside the grant: %v, want insufficient_privilege", err)
	}
	conn.Close(ctx)
	dsn := readSecret(t, target, "dsn")
	if c, err := pgx.Connect(ctx, dsn); err != nil {
		t.Errorf("connecting with the dsn file: %v", err)
	} else {
		c.Close(ctx)
	}

	// A republish (kubelet does it every minute) is OK and mints nothing new.
	if _, err := f.kube.Publish(ctx, pod, dbVolume("app-db")); err != nil {
		t.Fatalf("republish: %v", err)
	}
	if got := readFile(t, target, "username"); got != user {
		t.Errorf("republish changed the username")
	}
	if n, err := pg.CountRoles(ctx, "esc_team_a_agent_1_"); err != nil || n != 1 {
		t.Errorf("roles for the pod after republish: %d (%v), want 1", n, err)
	}

	// An open session is ended by the revocation.
	session, err := login(ctx, user, password)
	if err != nil {
		t.Fatal(err)
	}
	defer session.Close(ctx)

	if err := f.kube.Unpublish(ctx, pod, "db"); err != nil {
		t.Fatalf("unpublish: %v", err)
	}
	if _, err := os.Stat(target); !os.IsNotExist(err) {
		t.Errorf("target still there after unpublish: %v", err)
	}
	harness.Eventually(t, 10*time.Second, "role dropped", roleGone(ctx, user))
	if refused, err := loginRefused(ctx, user, password); !refused {
		t.Errorf("login after revocation was not refused: %v", err)
	}
	if err := session.Ping(ctx); err == nil {
		t.Errorf("the role's open session survived the revocation")
	}
	if left := harness.Mounts(filepath.Join(f.env.KubeletDir, "pods")); len(left) != 0 {
		t.Errorf("mounts left under the kubelet dir: %v", left)
	}
	if err := f.kube.Unpublish(ctx, pod, "db"); err != nil {
		t.Errorf("second unpublish: %v, want OK", err)
	}
	records := auditRecords(t, f.audit)
	for _, want := range []string{"request/success", "issue/success", "revoke/pending", "revoke/success"} {
		if !slices.Contains(records, want) {
			t.Errorf("audit trail %v lacks %s", records, want)
		}
	}
}

// firstSeenFlags returns the first_seen flag of each request record.
func firstSeenFlags(t *testing.T, path string) []bool {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var out []bool
	for _, line := range strings.Split(strings.TrimSpace(string(data)), "\n") {
		var r struct {
			Stage     string
			FirstSeen bool `json:"first_seen"`
		}
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			t.Fatal(err)
		}
		if r.Stage == "request" {
			out = append(out, r.FirstSeen)
		}
	}
	return out
}

// auditRecords returns "stage/outcome" of each audit record, in order.
func auditRecords(t *testing.T, path string) []string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var r struct{ Stage, Outcome string }
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			t.Fatalf("audit line %q: %v", sc.Text(), err)
		}
		out = append(out, r.Stage+"/"+r.Outcome)
	}
	return out
}

func TestRenewalExtendsTheRoleThenRotationSwapsIt(t *testing.T) {
	ctx := context.Background()
	f := setup(t, "6s", "15s")
	pod := newPod("renewer", "app")
	target, err := f.kube.Publish(ctx, pod, dbVolume("short-lived"))
	if err != nil {
		t.Fatalf("publish: %v", err)
	}
	user := readFile(t, target, "username")
	password := readSecret(t, target, "password")
	first, err := pg.ValidUntil(ctx, user)
	if err != nil {
		t.Fatal(err)
	}
	harness.Eventually(t, 10*time.Second, "VALID UNTIL extended on the same role", func() (bool, error) {
		v, err := pg.ValidUntil(ctx, user)
		return v.After(first), err
	})
	if got := readFile(t, target, "username"); got != user {
		t.Fatalf("renewal changed the username; want the same role extended")
	}
	// At maxTTL the role cannot be extended: a new one is swapped in and the old dropped.
	var next string
	harness.Eventually(t, 20*time.Second, "rotation to a new role", func() (bool, error) {
		next = readFile(t, target, "username")
		return next != user, nil
	})
	// A reader that read the old files just before the swap still logs in
	// with them: the old role outlives the swap by the rotation grace.
	if conn, err := login(ctx, user, password); err != nil {
		t.Errorf("old credentials refused right after the swap (no rotation grace): %v", err)
	} else {
		conn.Close(ctx)
	}
	readSecret(t, target, "password")
	harness.Eventually(t, 10*time.Second, "old role dropped after rotation", roleGone(ctx, user))
	if refused, err := loginRefused(ctx, user, password); !refused {
		t.Errorf("old credentials still log in: %v", err)
	}
	conn, err := login(ctx, next, readSecret(t, target, "password"))
	if err != nil {
		t.Fatalf("new credentials: %v", err)
	}
	conn.Close(ctx)
	if err := f.kube.Unpublish(ctx, pod, "db"); err != nil {
		t.Fatal(err)
	}
	harness.Eventually(t, 10*time.Second, "rotated-in role dropped at unpublish", roleGone(ctx, next))
	if !slices.Contains(auditRecords(t, f.audit), "rotate/success") || !slices.Contains(auditRecords(t, f.audit), "renew/success") {
		t.Errorf("audit lacks renew or rotate: %v", auditRecords(t, f.audit))
	}
}

func TestKilledAfterPublishResumesServingAndRenewing(t *testing.T) {
	ctx := context.Background()
	f := setup(t, "6s", "1h")
	pod := newPod("crashy", "app")
	target, err := f.kube.Publish(ctx, pod, dbVolume("short-lived"))
	if err != nil {
		t.Fatalf("publish: %v", err)
	}
	user := readFile(t, target, "username")
	password := readSecret(t, target, "password")

	f.driver.Kill()
	if err := f.driver.Start(ctx); err != nil {
		t.Fatalf("restart: %v", err)
	}
	if got := readFile(t, target, "username"); got != user {
		t.Fatalf("after restart the volume serves %q, want the same role", got)
	}
	before, _ := pg.ValidUntil(ctx, user)
	harness.Eventually(t, 10*time.Second, "renewal resumed after restart", func() (bool, error) {
		v, err := pg.ValidUntil(ctx, user)
		return v.After(before), err
	})
	// The pod's credentials outlive the original TTL thanks to the renewals.
	time.Sleep(time.Until(before) + time.Second)
	if conn, err := login(ctx, user, password); err != nil {
		t.Errorf("credentials expired despite renewal: %v", err)
	} else {
		conn.Close(ctx)
	}
	if _, err := f.kube.Publish(ctx, pod, dbVolume("short-lived")); err != nil {
		t.Fatalf("republish after restart: %v", err)
	}
	if n, _ := pg.CountRoles(ctx, "esc_team_a_crashy_"); n != 1 {
		t.Errorf("%d roles for the pod, want 1", n)
	}
	if err := f.kube.Unpublish(ctx, pod, "db"); err != nil {
		t.Fatal(err)
	}
	harness.Eventually(t, 10*time.Second, "role dropped", roleGone(ctx, user))
}

func TestKilledBetweenUnpublishAndRevocationStillRevokes(t *testing.T) {
	ctx := context.Background()
	f := setup(t, "1h", "2h")
	pod := newPod("killed", "app")
	target, err := f.kube.Publish(ctx, pod, dbVolume("app-db"))
	if err != nil {
		t.Fatalf("publish: %v", err)
	}
	user := readFile(t, target, "username")
	readSecret(t, target, "password")

	pg.Stop() // the revocation cannot reach PostgreSQL...
	restartPG := func() {
		if err := pg.Restart(); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.kube.Unpublish(ctx, pod, "db"); err != nil {
		restartPG()
		t.Fatalf("unpublish during outage: %v", err)
	}
	f.driver.Kill() // ...and the driver dies before it can.

	// The admin's view of the node while it is down: the revocation is pending.
	out, err := exec.Command(driverBin, "leases", "--state-dir", f.env.StateDir, "--json").Output()
	if err != nil {
		restartPG()
		t.Fatalf("leases: %v", err)
	}
	var inv lease.Inventory
	if err := json.Unmarshal(out, &inv); err != nil {
		restartPG()
		t.Fatal(err)
	}
	if len(inv.Live) != 0 || len(inv.Pending) != 1 || postgres.RoleName(inv.Pending[0].LeaseID) != user {
		t.Errorf("inventory while down: %s", out)
	}
	harness.RegisterLog(writeFile(t, f.env.Base, "leases.out", out))

	restartPG()
	if exists, _ := pg.RoleExists(ctx, user); !exists {
		t.Fatal("role vanished before the driver came back: the test proves nothing")
	}
	if err := f.driver.Start(ctx); err != nil {
		t.Fatalf("restart: %v", err)
	}
	harness.Eventually(t, 10*time.Second, "role dropped after restart", roleGone(ctx, user))
}

func writeFile(t *testing.T, dir, name string, data []byte) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestBackendOutageUnpublishIsFastAndRevocationCatchesUp(t *testing.T) {
	ctx := context.Background()
	f := setup(t, "1h", "2h")
	pod := newPod("outage", "app")
	target, err := f.kube.Publish(ctx, pod, dbVolume("app-db"))
	if err != nil {
		t.Fatalf("publish: %v", err)
	}
	user := readFile(t, target, "username")
	readSecret(t, target, "password")

	pg.Stop()
	// A republish during the outage is still OK: it asks the backend nothing.
	if _, err := f.kube.Publish(ctx, pod, dbVolume("app-db")); err != nil {
		_ = pg.Restart()
		t.Fatalf("republish during the outage: %v, want OK", err)
	}
	// A republish after the mount went away puts it back, the same credential.
	harness.UnmountUnder(target)
	if _, err := f.kube.Publish(ctx, pod, dbVolume("app-db")); err != nil {
		_ = pg.Restart()
		t.Fatalf("republish of a lost mount: %v, want OK", err)
	}
	if got := readFile(t, target, "username"); got != user {
		t.Errorf("the restored mount serves %q, want %q", got, user)
	}
	start := time.Now()
	err = f.kube.Unpublish(ctx, pod, "db")
	took := time.Since(start)
	if rerr := pg.Restart(); rerr != nil {
		t.Fatal(rerr)
	}
	if err != nil {
		t.Fatalf("unpublish during outage: %v", err)
	}
	// Not a benchmark: a bound far above any honest run, far below the
	// 5 s backend timeout an unpublish that waited on PostgreSQL would take.
	if took > 4*time.Second {
		t.Errorf("unpublish waited on the backend (%s)", took)
	}
	harness.Eventually(t, 15*time.Second, "role dropped once PostgreSQL is back, without a new call", roleGone(ctx, user))
}

func TestPodDeletedWhileDriverDownIsRevokedAtStart(t *testing.T) {
	ctx := context.Background()
	f := setup(t, "1h", "2h")
	pod := newPod("gone", "app")
	target, err := f.kube.Publish(ctx, pod, dbVolume("app-db"))
	if err != nil {
		t.Fatalf("publish: %v", err)
	}
	user := readFile(t, target, "username")
	readSecret(t, target, "password")
	f.driver.Kill()
	// Kubelet tore the pod down without reaching the driver.
	harness.UnmountUnder(filepath.Dir(target))
	if err := f.kube.RemovePod(pod); err != nil {
		t.Fatal(err)
	}
	if err := f.driver.Start(ctx); err != nil {
		t.Fatalf("restart: %v", err)
	}
	harness.Eventually(t, 10*time.Second, "role of the vanished pod dropped", roleGone(ctx, user))
	if left := harness.Mounts(filepath.Join(f.env.StateDir, "volumes")); len(left) != 0 {
		t.Errorf("volume tmpfs left behind: %v", left)
	}
}

func TestKilledDuringIssueLeavesNothing(t *testing.T) {
	ctx := context.Background()
	f := setup(t, "1h", "2h")
	pod := newPod("midissue", "app")
	// Hold the advisory lock the "blocking" role's creation statements take
	// after CREATE ROLE, so the issue hangs inside PostgreSQL.
	blocker, err := pgx.Connect(ctx, pg.AdminURL())
	if err != nil {
		t.Fatal(err)
	}
	defer blocker.Close(ctx)
	if _, err := blocker.Exec(ctx, `SELECT pg_advisory_lock(4242)`); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := f.kube.Publish(ctx, pod, dbVolume("blocking"))
		done <- err
	}()
	harness.Eventually(t, 5*time.Second, "issue waiting on the lock", func() (bool, error) {
		var waiting int
		err := blocker.QueryRow(ctx, `SELECT count(*) FROM pg_locks WHERE NOT granted`).Scan(&waiting)
		return waiting > 0, err
	})
	f.driver.Kill()
	if err := <-done; err == nil {
		t.Fatal("publish succeeded although the driver was killed during it")
	}
	if _, err := blocker.Exec(ctx, `SELECT pg_advisory_unlock(4242)`); err != nil {
		t.Fatal(err)
	}
	if err := f.driver.Start(ctx); err != nil {
		t.Fatalf("restart: %v", err)
	}
	if left := harness.Mounts(filepath.Join(f.env.KubeletDir, "pods")); len(left) != 0 {
		t.Errorf("mounts left: %v", left)
	}
	if left := harness.Mounts(filepath.Join(f.env.StateDir, "volumes")); len(left) != 0 {
		t.Errorf("volume tmpfs left: %v", left)
	}
	harness.Eventually(t, 10*time.Second, "interrupted issue revoked and queue empty", func() (bool, error) {
		out, err := exec.Command(driverBin, "leases", "--state-dir", f.env.StateDir, "--json").Output()
		if err != nil {
			return false, err
		}
		var inv lease.Inventory
		err = json.Unmarshal(out, &inv)
		return len(inv.Live) == 0 && len(inv.Pending) == 0, err
	})
	if n, _ := pg.CountRoles(ctx, "esc_team_a_midissue_"); n != 0 {
		t.Errorf("%d roles left for the pod", n)
	}
	// kubelet retries the publish, which now works.
	if _, err := f.kube.Publish(ctx, pod, dbVolume("blocking")); err != nil {
		t.Fatalf("retried publish: %v", err)
	}
	readSecret(t, f.kube.TargetPath(pod, "db"), "password")
	if err := f.kube.Unpublish(ctx, pod, "db"); err != nil {
		t.Fatal(err)
	}
}

func TestSweepRevokesATargetThatVanishedWhileRunning(t *testing.T) {
	ctx := context.Background()
	f := setup(t, "1h", "2h", "--sweep-interval", "300ms")
	pod := newPod("swept", "app")
	target, err := f.kube.Publish(ctx, pod, dbVolume("app-db"))
	if err != nil {
		t.Fatalf("publish: %v", err)
	}
	user := readFile(t, target, "username")
	readSecret(t, target, "password")
	// The mount goes away without an unpublish (a node agent cleaned up).
	harness.UnmountUnder(target)
	harness.Eventually(t, 10*time.Second, "role of the vanished target dropped by the sweep", roleGone(ctx, user))
	if left := harness.Mounts(filepath.Join(f.env.StateDir, "volumes")); len(left) != 0 {
		t.Errorf("volume tmpfs left behind: %v", left)
	}
	if err := f.kube.Unpublish(ctx, pod, "db"); err != nil {
		t.Errorf("late unpublish: %v, want OK", err)
	}
}

func TestMetricsAndHealthFollowTheLifecycle(t *testing.T) {
	ctx := context.Background()
	f := setup(t, "1h", "2h")
	if code, _, err := f.driver.Scrape("/readyz"); err != nil || code != 200 {
		t.Fatalf("/readyz: %d %v", code, err)
	}
	if code, _, err := f.driver.Scrape("/healthz"); err != nil || code != 200 {
		t.Fatalf("/healthz: %d %v", code, err)
	}
	pod := newPod("metered", "app")
	target, err := f.kube.Publish(ctx, pod, dbVolume("app-db"))
	if err != nil {
		t.Fatalf("publish: %v", err)
	}
	user := readFile(t, target, "username")
	readSecret(t, target, "password")
	_, body, err := f.driver.Scrape("/metrics")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		`ephemeral_secrets_live_leases{provider="postgres"} 1`,
		`ephemeral_secrets_lease_operations_total{operation="issue",outcome="success",provider="postgres"} 1`,
		`ephemeral_secrets_csi_operation_duration_seconds_count{code="OK",method="NodePublishVolume"} 1`,
		`ephemeral_secrets_revocation_queue_depth 0`,
		`ephemeral_secrets_first_seen_requests_total{namespace="team-a"} 1`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("after publish, /metrics lacks %s", want)
		}
	}
	// The same service account and class again is not first seen.
	again := newPod("metered-2", "app")
	if _, err := f.kube.Publish(ctx, again, dbVolume("app-db")); err != nil {
		t.Fatal(err)
	}
	readSecret(t, f.kube.TargetPath(again, "db"), "password")
	if err := f.kube.Unpublish(ctx, again, "db"); err != nil {
		t.Fatal(err)
	}
	if got := firstSeenFlags(t, f.audit); len(got) < 2 || !got[0] || got[1] {
		t.Errorf("first_seen of the request records: %v, want [true false]", got)
	}
	// A refused publish counts as an authorisation failure.
	nosy := newPod("nosy", "app")
	if _, err := f.kube.Publish(ctx, nosy, dbVolume("payroll")); err == nil {
		t.Fatal("unauthorised publish succeeded")
	}
	if err := f.kube.Unpublish(ctx, pod, "db"); err != nil {
		t.Fatal(err)
	}
	harness.Eventually(t, 10*time.Second, "role dropped", roleGone(ctx, user))
	harness.Eventually(t, 5*time.Second, "metrics after unpublish", func() (bool, error) {
		_, body, err = f.driver.Scrape("/metrics")
		return strings.Contains(body, `ephemeral_secrets_lease_operations_total{operation="revoke",outcome="success",provider="postgres"} 2`), err
	})
	for _, want := range []string{
		`ephemeral_secrets_authorization_failures_total{provider="postgres"} 1`,
		`ephemeral_secrets_first_seen_requests_total{namespace="team-a"} 2`,
		`ephemeral_secrets_csi_operation_duration_seconds_count{code="PermissionDenied",method="NodePublishVolume"} 1`,
		`ephemeral_secrets_csi_operation_duration_seconds_count{code="OK",method="NodeUnpublishVolume"} 2`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("after unpublish, /metrics lacks %s", want)
		}
	}
	if strings.Contains(body, `ephemeral_secrets_live_leases{provider="postgres"} 1`) {
		t.Errorf("the revoked lease is still counted live")
	}
	if strings.Contains(body, user) {
		t.Errorf("a role name reached the metrics")
	}
}
