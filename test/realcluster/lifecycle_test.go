package realcluster

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ephemeral-secrets/csi-driver/pkg/audit"
	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/kube"
	"github.com/ephemeral-secrets/csi-driver/test/node"
)

type syscallStat = syscall.Stat_t

var rotatingUser = regexp.MustCompile(`login ok: user=(esc_team_rotate_[a-z0-9_]+)`)

func usersIn(logs string) map[string]bool {
	out := map[string]bool{}
	for _, m := range rotatingUser.FindAllStringSubmatch(logs, -1) {
		out[m[1]] = true
	}
	return out
}

// testDriverRestart: the driver's pod is deleted while app pods run; the
// DaemonSet's new pod recovers, the app pods keep their mounts and
// renewals, and an app pod deleted during the gap is still revoked.
func testDriverRestart(t *testing.T) {
	ctx := context.Background()
	startRotatingPod(t, "doomed")
	doomedLogs := waitLog(t, rotatingNS, "doomed", "agent", time.Minute, rotatingUser.String())
	doomedRole := rotatingUser.FindStringSubmatch(doomedLogs)[1]

	old := driverPod(t)
	auditRecords(t, old) // keep its log for the secret search
	seenBefore := usersIn(podLogs(t, rotatingNS, "rotating", "agent"))
	if err := cluster.Clients.CoreV1().Pods(node.Namespace).Delete(ctx, old.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	// During the gap: the app pod goes. kubelet cannot unpublish until a
	// driver answers again, and keeps trying.
	if err := cluster.Clients.CoreV1().Pods(rotatingNS).Delete(ctx, "doomed", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	var fresh *corev1.Pod
	harness.Eventually(t, 2*time.Minute, "a new driver pod", func() (bool, error) {
		p := driverPod(t)
		fresh = p
		return p.UID != old.UID, nil
	})
	if err := cluster.WaitDriverRegistered(ctx); err != nil {
		t.Fatal(err)
	}
	report(t, "driver pod replaced and registered", time.Since(start))
	roleGone(t, doomedRole, 3*time.Minute)

	// The running pod kept its mount and its credential stayed good: it
	// logs in as a rotated role it had not used before the restart, and
	// never restarted.
	harness.Eventually(t, 90*time.Second, "the running pod logging in with a credential rotated after the restart", func() (bool, error) {
		for u := range usersIn(podLogs(t, rotatingNS, "rotating", "agent")) {
			if !seenBefore[u] {
				return true, nil
			}
		}
		return false, nil
	})
	p, err := cluster.Clients.CoreV1().Pods(rotatingNS).Get(ctx, "rotating", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if cs := p.Status.ContainerStatuses; len(cs) != 1 || cs[0].RestartCount != 0 {
		t.Fatalf("the running pod restarted: %+v", cs)
	}
	rs := auditRecords(t, fresh)
	if n := len(recordsOf(rs, "rotating", audit.Rotate)) + len(recordsOf(rs, "rotating", audit.Renew)); n == 0 {
		t.Fatal("the new driver neither renewed nor rotated the running pod's lease")
	}
	if n := len(recordsOf(rs, "rotating", audit.Issue)); n != 0 {
		t.Fatalf("the new driver issued %d leases for the running pod: recovery must resume, not re-issue", n)
	}
	found := false
	for _, r := range recordsOf(rs, "doomed", audit.Revoke) {
		found = found || r.Outcome == audit.Success
	}
	if !found {
		t.Fatal("no successful revoke record for the pod deleted during the gap")
	}
}

// driverPID finds the driver's process (in its container) on the node.
func driverPID(t *testing.T) int {
	t.Helper()
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		comm, err := os.ReadFile(filepath.Join("/proc", e.Name(), "comm"))
		cg, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cgroup"))
		// The driver in its container: in a pod's cgroup (other tests on
		// the machine may run driver binaries too). comm is cut at 15 bytes.
		// The issuer runs the same binary: its first argument says so.
		args, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		issuer := len(strings.Split(string(args), "\x00")) > 1 && strings.Split(string(args), "\x00")[1] == "issuer"
		if err == nil && strings.TrimSpace(string(comm)) == "ephemeral-secre" && strings.Contains(string(cg), "/kubepods") && !issuer {
			var pid int
			fmt.Sscanf(e.Name(), "%d", &pid)
			return pid
		}
	}
	t.Fatal("no driver process on the node")
	return 0
}

// testDriverReach: the driver container sees the pods' directories and
// its own plugin directory, not kubelet's keys or another driver's socket.
func testDriverReach(t *testing.T) {
	other := "/var/lib/kubelet/plugins/other.csi.example"
	if err := os.MkdirAll(other, 0o750); err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(other)
	l, err := net.Listen("unix", filepath.Join(other, "csi.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if _, err := os.Stat("/var/lib/kubelet/pki"); err != nil {
		t.Fatalf("kubelet has no pki directory to protect: %v", err)
	}
	// The driver pod was started before the other socket existed: restart
	// it so that it sees the node as it is now.
	root := fmt.Sprintf("/proc/%d/root", driverPID(t))
	for _, path := range []string{"/var/lib/kubelet/pki", other + "/csi.sock", "/var/lib/kubelet/plugins_registry/../pki"} {
		if _, err := os.Stat(root + path); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("the driver container can reach %s (stat: %v)", path, err)
		}
	}
	for _, path := range []string{"/var/lib/kubelet/pods", "/csi/csi.sock"} {
		if _, err := os.Stat(root + path); err != nil {
			t.Errorf("the driver container lacks %s: %v", path, err)
		}
	}
}

// testUninstallLeavesNothing: with no pod using the driver, helm
// uninstall leaves no mount, no state and no socket on the node.
func testUninstallLeavesNothing(t *testing.T) {
	ctx := context.Background()
	logs := podLogs(t, rotatingNS, "rotating", "agent")
	users := usersIn(logs)
	deletePod(t, rotatingNS, "rotating")
	for u := range users {
		roleGone(t, u, 2*time.Minute)
	}
	drv := driverPod(t)
	auditRecords(t, drv)
	driverLog := followLogs(t, drv, "driver")
	if _, err := cluster.Helm(ctx, "uninstall", "ephemeral-secrets-csi", "--namespace", node.Namespace, "--wait", "--timeout", "2m"); err != nil {
		t.Fatal(err)
	}
	harness.Eventually(t, 2*time.Minute, "the driver pod gone", func() (bool, error) {
		pods, err := cluster.Clients.CoreV1().Pods(node.Namespace).List(ctx, metav1.ListOptions{})
		return err == nil && len(pods.Items) == 0, err
	})
	harness.Eventually(t, time.Minute, "kubelet to drop the driver from CSINode", func() (bool, error) {
		cn, err := cluster.Clients.StorageV1().CSINodes().Get(ctx, node.Name, metav1.GetOptions{})
		return err == nil && len(cn.Spec.Drivers) == 0, err
	})
	if log := driverLog(); !strings.Contains(log, "state directory released") {
		t.Errorf("the driver did not release its state at shutdown; its log ends:\n%s", tail(log, 1500))
	}
	for _, m := range harness.Mounts("/var/lib/kubelet/pods/") {
		if strings.Contains(m, "kubernetes.io~csi") {
			t.Errorf("CSI volume still mounted: %s", m)
		}
	}
	// The node covers the directory with one tmpfs of its own (package
	// node); the driver's state tmpfs would be a second.
	if m := harness.Mounts("/run/ephemeral-secrets-csi"); len(m) != 1 {
		t.Errorf("state directory mounts: %v; want only the node's own", m)
	}
	if entries, _ := os.ReadDir("/run/ephemeral-secrets-csi"); len(entries) > 0 {
		t.Errorf("state directory holds %d entries", len(entries))
	}
	for _, dir := range []string{"/var/lib/kubelet/plugins/ephemeral-secrets.csi.dev", "/var/lib/kubelet/plugins_registry"} {
		entries, _ := os.ReadDir(dir)
		for _, e := range entries {
			t.Errorf("left in %s: %s", dir, e.Name())
		}
	}
}

// testKustomizeInstall: the kustomize base installs a working driver too
// (its image set with kustomize's images field, the only change).
func testKustomizeInstall(t *testing.T) {
	ctx := context.Background()
	overlay := t.TempDir()
	base, err := filepath.Rel(overlay, filepath.Join(repoRoot, "deploy/kustomize/base"))
	if err != nil {
		t.Fatal(err)
	}
	k := fmt.Sprintf("resources: [%s]\nimages:\n- name: %s\n  newName: %s\n  newTag: %s\n",
		base, chartImage(t), node.DriverRepository, node.ImageTag)
	if err := os.WriteFile(filepath.Join(overlay, "kustomization.yaml"), []byte(k), 0o644); err != nil {
		t.Fatal(err)
	}
	kz, err := harness.Tool("kustomize")
	if err != nil {
		t.Fatal(err)
	}
	out, err := runTool(kz, "build", overlay)
	if err != nil {
		t.Fatal(err)
	}
	if err := kube.Apply(ctx, cluster.Config(), out, false); err != nil {
		t.Fatal(err)
	}
	if err := cluster.WaitDriverRegistered(ctx); err != nil {
		t.Fatal(err)
	}
	// One pod through the kustomize-installed driver, then everything goes.
	pod := startRotatingPod(t, "via-kustomize")
	waitLog(t, rotatingNS, pod.Name, "agent", time.Minute, `forbidden query refused`)
	auditRecords(t, driverPod(t))
	deletePod(t, rotatingNS, pod.Name)
	if err := kube.Delete(ctx, cluster.Config(), out); err != nil {
		t.Fatal(err)
	}
}

// chartImage is the driver image the kustomize base names.
func chartImage(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(repoRoot, "deploy/kustomize/base/daemonset.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`image: (\S+?)(:[^:\s]+)?\n`).FindSubmatch(b)
	if m == nil {
		t.Fatal("no image in the kustomize base's DaemonSet")
	}
	return string(m[1])
}

func runTool(bin string, args ...string) ([]byte, error) {
	out, err := exec.Command(bin, args...).Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return nil, fmt.Errorf("%s %s: %v: %s", filepath.Base(bin), strings.Join(args, " "), err, ee.Stderr)
		}
	}
	return out, err
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}
