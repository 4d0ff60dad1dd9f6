package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"

	"github.com/ephemeral-secrets/csi-driver/pkg/driver"
	"github.com/ephemeral-secrets/csi-driver/test/harness"
)

// pluginWatcher plays kubelet's plugin watcher on a registration socket:
// GetInfo, then the verdict.
func pluginWatcher(t *testing.T, sock string, registered bool) {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := registerapi.NewRegistrationClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	info, err := c.GetInfo(ctx, &registerapi.InfoRequest{})
	if err != nil {
		t.Fatalf("GetInfo on %s: %v", sock, err)
	}
	if info.Name != driver.Name || info.Type != registerapi.CSIPlugin {
		t.Fatalf("GetInfo = %+v", info)
	}
	status := &registerapi.RegistrationStatus{PluginRegistered: registered}
	if !registered {
		status.Error = "plugin version not supported"
	}
	if _, err := c.NotifyRegistrationStatus(ctx, status); err != nil {
		t.Fatalf("NotifyRegistrationStatus: %v", err)
	}
}

// fileID tells one file from the next made at the same path: the inode
// alone does not (a removed socket's inode is handed to the next one).
func fileID(path string) string {
	var st syscall.Stat_t
	if syscall.Stat(path, &st) != nil {
		return ""
	}
	return fmt.Sprintf("%d/%d.%09d", st.Ino, st.Ctim.Sec, st.Ctim.Nsec)
}

// endpointReady probes the CSI socket as kubelet would.
func endpointReady(ctx context.Context, endpoint string) func() (bool, error) {
	return func() (bool, error) {
		return driver.ProbeEndpoint(ctx, endpoint) == nil, nil
	}
}

func scrapeStatus(t *testing.T, d *harness.Driver, path string) (int, string) {
	t.Helper()
	code, body, err := d.Scrape(path)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return code, body
}

func waitStatus(t *testing.T, d *harness.Driver, path string, code int, holds string) {
	t.Helper()
	harness.Eventually(t, 20*time.Second, fmt.Sprintf("%s %d %q", path, code, holds), func() (bool, error) {
		c, body, err := d.Scrape(path)
		if err != nil {
			return false, err
		}
		if c != code || !strings.Contains(body, holds) {
			return false, fmt.Errorf("%d %q", c, body)
		}
		return true, nil
	})
}

// A driver is ready only once kubelet has registered it and its socket
// answers: before, a driver kubelet never registered was ready, and a
// rollout went on to the next node with this one unserved.
func TestReadyOnlyOnceKubeletRegisteredTheDriver(t *testing.T) {
	regDir := t.TempDir()
	f := setup(t, "1h", "2h", "--registration-dir", regDir)
	sock := filepath.Join(regDir, driver.Name+"-reg.sock")
	harness.Eventually(t, 10*time.Second, "the registration socket", func() (bool, error) { return fileID(sock) != "", nil })
	if code, body := scrapeStatus(t, f.driver, "/readyz"); code != 503 || !strings.Contains(body, "kubelet has not registered") {
		t.Fatalf("/readyz of a driver kubelet never registered: %d %q, want 503", code, body)
	}
	if code, _ := scrapeStatus(t, f.driver, "/healthz"); code != 200 {
		t.Fatalf("/healthz while unregistered: %d, want 200 (waiting for kubelet is no reason to restart)", code)
	}
	pluginWatcher(t, sock, false)
	waitStatus(t, f.driver, "/healthz", 503, "refused")
	if code, _ := scrapeStatus(t, f.driver, "/readyz"); code != 503 {
		t.Fatalf("/readyz after kubelet refused the driver: %d, want 503", code)
	}
	pluginWatcher(t, sock, true)
	waitStatus(t, f.driver, "/readyz", 200, "ok")
	waitStatus(t, f.driver, "/healthz", 200, "ok")
}

// Two drivers on one node (a DaemonSet's surge): the second waits for the
// node lock, live, touching neither socket nor state, while the first
// serves and renews; when the first exits, by SIGTERM or SIGKILL, the
// second takes the socket, the registration and the volumes over, renews
// what the first published and revokes it at unpublish.
func TestSurgeHandsTheNodeOver(t *testing.T) {
	for _, tc := range []struct {
		name string
		stop func(*harness.Driver)
	}{
		{"SIGTERM", (*harness.Driver).Stop},
		{"SIGKILL", (*harness.Driver).Kill},
	} {
		t.Run(tc.name, func(t *testing.T) { testHandover(t, tc.stop) })
	}
}

func testHandover(t *testing.T, stop func(*harness.Driver)) {
	ctx := context.Background()
	regDir := t.TempDir()
	f := setup(t, "6s", "1h", "--registration-dir", regDir)
	regSock := filepath.Join(regDir, driver.Name+"-reg.sock")
	harness.Eventually(t, 10*time.Second, "the first's registration socket", func() (bool, error) { return fileID(regSock) != "", nil })
	pluginWatcher(t, regSock, true)
	waitStatus(t, f.driver, "/readyz", 200, "ok")

	pod := newPod("surge", "app")
	target, err := f.kube.Publish(ctx, pod, dbVolume("short-lived"))
	if err != nil {
		t.Fatalf("publish through the first: %v", err)
	}
	user := readFile(t, target, "username")
	readSecret(t, target, "password")

	// The second instance: the same node, the same flags.
	second := &harness.Driver{Bin: f.driver.Bin, Env: f.env, Args: f.driver.Args}
	if err := second.Launch(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		second.Stop()
		if t.Failed() {
			t.Logf("second driver log (tail):\n%s", second.LogTail(4000))
		}
	})
	harness.Eventually(t, 30*time.Second, "the second waiting for the node lock", func() (bool, error) {
		return strings.Contains(second.LogTail(1<<20), "Waiting for the node lock"), nil
	})
	csiSock, lockFile := f.env.Socket, filepath.Join(filepath.Dir(f.env.Socket), driver.LockFileName)
	csiID, regID := fileID(csiSock), fileID(regSock)
	mounts := strings.Join(harness.Mounts(f.env.Base), "\n")
	// Live, and ready while the first serves: a surge rollout deletes the
	// old pod only once the new one is ready.
	if code, _ := scrapeStatus(t, second, "/healthz"); code != 200 {
		t.Fatalf("the waiting second is not live: %d", code)
	}
	if code, body := scrapeStatus(t, second, "/readyz"); code != 200 {
		t.Fatalf("the waiting second is not ready while the first serves: %d %q", code, body)
	}
	if _, body := scrapeStatus(t, second, "/metrics"); !strings.Contains(body, "ephemeral_secrets_node_lock_held 0") {
		t.Errorf("the waiting second's node_lock_held is not 0")
	}
	holder, _ := os.ReadFile(lockFile)
	if !strings.Contains(string(holder), fmt.Sprintf("pid %d", f.driver.Pid())) {
		t.Errorf("the lock file names %q, want the first (pid %d)", holder, f.driver.Pid())
	}

	// The first still serves the node: it renews the lease...
	before, err := pg.ValidUntil(ctx, user)
	if err != nil {
		t.Fatal(err)
	}
	harness.Eventually(t, 15*time.Second, "the first renewing while the second waits", func() (bool, error) {
		v, err := pg.ValidUntil(ctx, user)
		return v.After(before), err
	})
	// ...and answers kubelet on its own socket, which the second left alone.
	if _, err := f.kube.Publish(ctx, pod, dbVolume("short-lived")); err != nil {
		t.Fatalf("republish through the first while the second waits: %v", err)
	}
	if fileID(csiSock) != csiID || fileID(regSock) != regID {
		t.Fatal("the waiting second replaced the CSI or the registration socket")
	}
	if now := strings.Join(harness.Mounts(f.env.Base), "\n"); now != mounts {
		t.Fatalf("the waiting second changed the mounts:\nbefore:\n%s\nafter:\n%s", mounts, now)
	}
	for _, never := range []string{"Serving CSI", "Serving kubelet plugin registration", "Holding the node lock"} {
		if strings.Contains(second.LogTail(1<<20), never) {
			t.Fatalf("the waiting second logged %q", never)
		}
	}

	// The first goes; the second takes over.
	stopped := time.Now()
	stop(f.driver)
	exited := time.Now()
	harness.Eventually(t, 30*time.Second, "the second serving the CSI socket", endpointReady(ctx, f.env.Endpoint()))
	t.Logf("MEASURED handover, first exited -> second's socket ready: %s (the first's shutdown took %s)",
		time.Since(exited).Round(time.Millisecond), exited.Sub(stopped).Round(time.Millisecond))
	if fileID(csiSock) == csiID {
		t.Error("the CSI socket is still the first's")
	}
	harness.Eventually(t, 10*time.Second, "the second's registration socket", func() (bool, error) {
		id := fileID(regSock)
		return id != "" && id != regID, nil
	})
	// Not ready until kubelet registered the new instance.
	waitStatus(t, second, "/readyz", 503, "kubelet has not registered")
	pluginWatcher(t, regSock, true)
	waitStatus(t, second, "/readyz", 200, "ok")
	if _, body := scrapeStatus(t, second, "/metrics"); !strings.Contains(body, "ephemeral_secrets_node_lock_held 1") {
		t.Errorf("the serving second's node_lock_held is not 1")
	}

	// The volume the first published: the same role, renewed by the second.
	if got := readFile(t, target, "username"); got != user {
		t.Fatalf("after the handover the volume serves %q, want the same role", got)
	}
	before, err = pg.ValidUntil(ctx, user)
	if err != nil {
		t.Fatal(err)
	}
	harness.Eventually(t, 15*time.Second, "the second renewing the first's lease", func() (bool, error) {
		v, err := pg.ValidUntil(ctx, user)
		return v.After(before), err
	})
	if _, err := f.kube.Publish(ctx, pod, dbVolume("short-lived")); err != nil {
		t.Fatalf("republish through the second: %v", err)
	}
	if n, _ := pg.CountRoles(ctx, "esc_team_a_surge_"); n != 1 {
		t.Errorf("%d roles for the pod, want 1", n)
	}
	if err := f.kube.Unpublish(ctx, pod, "db"); err != nil {
		t.Fatalf("unpublish through the second: %v", err)
	}
	harness.Eventually(t, 10*time.Second, "the role dropped by the second", roleGone(ctx, user))
}
