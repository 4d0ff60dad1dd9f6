package realcluster

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/ephemeral-secrets/csi-driver/pkg/apis/ephemeralsecrets/v1alpha1"
	"github.com/ephemeral-secrets/csi-driver/pkg/inventory"
	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/node"
)

// testAdminCredentialOnlyInTheIssuer: the running node plugin has no
// file or environment variable holding the PostgreSQL admin password;
// each issuer replica has it (so the search can find it).
func testAdminCredentialOnlyInTheIssuer(t *testing.T) {
	if where := findAdminPassword(t, driverPID(t)); where != "" {
		t.Fatalf("the node plugin's container holds the admin password: %s", where)
	}
	issuers := productPIDs("issuer")
	if len(issuers) != 2 {
		t.Fatalf("%d issuer processes on the node, want the chart's 2 replicas", len(issuers))
	}
	for _, pid := range issuers {
		if findAdminPassword(t, pid) == "" {
			t.Fatalf("issuer process %d: the admin password not found; the search cannot see it", pid)
		}
	}
	mi, err := os.ReadFile(fmt.Sprintf("/proc/%d/mountinfo", driverPID(t)))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(mi), "/etc/ephemeral-secrets/issuer") {
		t.Fatal("the node plugin mounts the issuer's Secret")
	}
}

// findAdminPassword says where in the container of process pid the
// admin password is: its environment, or a file of a Secret or service
// account directory. Empty: nowhere.
func findAdminPassword(t *testing.T, pid int) string {
	t.Helper()
	root := fmt.Sprintf("/proc/%d/root", pid)
	env, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(env), db.AdminPassword) {
		return "environment"
	}
	found := ""
	for _, dir := range []string{"/etc", "/var/run/secrets", "/run/secrets", "/tmp"} {
		_ = filepath.WalkDir(root+dir, func(path string, d fs.DirEntry, err error) error {
			if err != nil || found != "" || d.IsDir() {
				return nil
			}
			if info, err := d.Info(); err != nil || info.Size() > 1<<20 {
				return nil
			}
			if b, err := os.ReadFile(path); err == nil && strings.Contains(string(b), db.AdminPassword) {
				found = strings.TrimPrefix(path, root)
			}
			return nil
		})
	}
	return found
}

// credentialOf waits for the inventory's record of the pod's credential.
func credentialOf(t *testing.T, pod *corev1.Pod) *v1alpha1.Credential {
	t.Helper()
	inv := inventoryClient(t)
	var cred *v1alpha1.Credential
	harness.Eventually(t, time.Minute, "the Credential of pod "+pod.Name, func() (bool, error) {
		l, err := inv.List(context.Background(), pod.Namespace, metav1.ListOptions{LabelSelector: v1alpha1.LabelPodUID + "=" + string(pod.UID)})
		if err != nil {
			return false, err
		}
		for i := range l.Items {
			if l.Items[i].Status.State == v1alpha1.StateIssued && l.Items[i].DeletionTimestamp == nil {
				cred = &l.Items[i]
				return true, nil
			}
		}
		return false, nil
	})
	return cred
}

func inventoryClient(t *testing.T) *inventory.Client {
	t.Helper()
	c, err := inventory.NewClient(cluster.RestConfig())
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// startExample runs examples/postgres and returns its pod, its role, the
// password it read and a session held open with it.
func startExample(t *testing.T) (*corev1.Pod, string, string, *pgx.Conn) {
	t.Helper()
	applyExample(t, "examples/postgres")
	pod := waitPod(t, "ai-agents", "research-agent", 2*time.Minute, corev1.PodRunning)
	logs := waitLog(t, "ai-agents", "research-agent", "agent", time.Minute, exampleRole.String())
	role := exampleRole.FindStringSubmatch(logs)[1]
	password := volumeFile(t, pod, "db", "password")
	harness.RememberSecret(password)
	held, err := pgx.Connect(context.Background(), db.URLFor(role, password, "shop"))
	if err != nil {
		t.Fatalf("a session with the pod's credential: %v", err)
	}
	t.Cleanup(func() { held.Close(context.Background()) })
	return pod, role, password, held
}

// testInventoryAndKillSwitch: the pod's credential is a Credential object
// that says what it is and holds nothing secret; deleting it (the kill
// switch) drops the role, ends its sessions and empties the volume, and
// the pod is never given another.
func testInventoryAndKillSwitch(t *testing.T) {
	ctx := context.Background()
	pod, role, password, held := startExample(t)
	cred := credentialOf(t, pod)
	if cred.Spec.Node != node.Name || cred.Spec.Provider != "postgres" || cred.Spec.Pod.Name != pod.Name ||
		cred.Spec.Pod.ServiceAccount != "research-agent" || cred.Status.BackendName != role || cred.Status.ExpiresAt == nil {
		t.Fatalf("Credential %s says %+v / %+v; want node %s, postgres, pod %s, role %s, an expiry", cred.Name, cred.Spec, cred.Status, node.Name, pod.Name, role)
	}
	if len(cred.OwnerReferences) != 1 || cred.OwnerReferences[0].UID != pod.UID {
		t.Fatalf("Credential owners %+v: want the pod", cred.OwnerReferences)
	}

	start := time.Now()
	if err := inventoryClient(t).Delete(ctx, cred.Namespace, cred.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	var refused time.Time
	harness.Eventually(t, time.Minute, "the pod's credential refused", func() (bool, error) {
		c, err := pgx.Connect(ctx, db.URLFor(role, password, "shop"))
		if err == nil {
			c.Close(ctx)
			return false, nil
		}
		refused = time.Now()
		return true, nil
	})
	report(t, "Credential deleted -> login refused", refused.Sub(start))
	roleGone(t, role, time.Minute)
	if err := held.Ping(ctx); err == nil {
		t.Fatal("a session of the killed credential still answers")
	}
	dir := filepath.Join("/var/lib/kubelet/pods", string(pod.UID), "volumes/kubernetes.io~csi/db/mount")
	harness.Eventually(t, time.Minute, "the pod's volume emptied", func() (bool, error) {
		_, err := os.Stat(filepath.Join(dir, "password"))
		return errors.Is(err, os.ErrNotExist), nil
	})
	report(t, "Credential deleted -> files gone", time.Since(start))
	// The pod lives on with an empty volume and a Warning saying why; it
	// gets no new credential (kubelet's republishes included).
	harness.Eventually(t, time.Minute, "a Warning event on the pod about the withdrawn credential", func() (bool, error) {
		for _, e := range warnings(t, pod.Namespace, pod.Name) {
			if strings.Contains(e.Message, "withdrawn") || strings.Contains(e.Message, "deleted") {
				return true, nil
			}
		}
		return false, nil
	})
	time.Sleep(5 * time.Second)
	l, err := inventoryClient(t).List(ctx, pod.Namespace, metav1.ListOptions{LabelSelector: v1alpha1.LabelPodUID + "=" + string(pod.UID)})
	if err != nil {
		t.Fatal(err)
	}
	// Its one record is the tombstone the kill left (the volume is never
	// issued again while the pod lives).
	if len(l.Items) != 1 || !inventory.IsTombstone(&l.Items[0]) {
		t.Fatalf("the killed pod holds %d Credentials, want its volume's tombstone alone: %+v", len(l.Items), l.Items)
	}
	if p := waitPod(t, pod.Namespace, pod.Name, time.Minute, corev1.PodRunning); p.UID != pod.UID {
		t.Fatal("the pod was replaced")
	}
	deletePod(t, pod.Namespace, pod.Name)
}

// testNodeLoss: the node plugin gone with its record of a volume (the
// node rebooted, or was replaced), then the Pod deleted as the node
// lifecycle controller would: the issuer drops the role and ends its
// sessions, with no node plugin to ask it.
func testNodeLoss(t *testing.T) {
	ctx := context.Background()
	pod, role, _, held := startExample(t)
	credentialOf(t, pod)
	// A pod whose Pod object nobody deletes: its short-TTL role must die
	// at VALID UNTIL plus the issuer's reap interval, with no node plugin
	// to renew or revoke it.
	orphan := startRotatingPod(t, "orphan")
	waitLog(t, rotatingNS, "orphan", "agent", time.Minute, rotatingUser.String())

	// The node plugin goes: its DaemonSet no longer selects the node.
	setDriverNodeSelector(t, map[string]string{"esc-test/absent": "true"})
	restored := false
	defer func() {
		if !restored {
			setDriverNodeSelector(t, nil)
		}
	}()
	harness.Eventually(t, 2*time.Minute, "the node plugin gone", func() (bool, error) { return len(productPIDs("serve")) == 0, nil })
	nodeGone := time.Now()
	orphanRole := envValue(t, volumeFile(t, orphan, "db", "pg.env"), "PGUSER")
	harness.RememberSecret(envValue(t, volumeFile(t, orphan, "db", "pg.env"), "PGPASSWORD"))
	// Its state of the volume goes too: the pod's mount, and the volume's
	// record and files in the state directory.
	target := filepath.Join("/var/lib/kubelet/pods", string(pod.UID), "volumes/kubernetes.io~csi/db/mount")
	if err := unix.Unmount(target, unix.MNT_DETACH); err != nil {
		t.Fatalf("unmounting the pod's volume: %v", err)
	}
	wipeVolumeState(t, pod.UID)

	start := time.Now()
	grace := int64(0)
	if err := cluster.Clients.CoreV1().Pods(pod.Namespace).Delete(ctx, pod.Name, metav1.DeleteOptions{GracePeriodSeconds: &grace}); err != nil {
		t.Fatal(err)
	}
	gone := roleGone(t, role, 2*time.Minute)
	report(t, "pod force-deleted, node plugin gone -> role dropped", gone.Sub(start))
	if err := held.Ping(ctx); err == nil {
		t.Fatal("a session of the lost node's credential still answers")
	}

	// The orphan's role, never renewed again, expires (TTL 6 s) and the
	// issuer reaps it (reap interval 5 s in testdata/values.yaml).
	orphanGone := roleGone(t, orphanRole, 2*time.Minute)
	report(t, "node plugin gone, pod kept -> its role reaped", orphanGone.Sub(nodeGone))

	setDriverNodeSelector(t, nil)
	restored = true
	if err := cluster.WaitDriverRegistered(ctx); err != nil {
		t.Fatal(err)
	}
	harness.Eventually(t, 2*time.Minute, "the node plugin back", func() (bool, error) { return len(productPIDs("serve")) == 1, nil })
	// Back, the node plugin gives the orphan (still there, on its node) a
	// fresh credential: the issuer's pod check passes.
	harness.Eventually(t, 2*time.Minute, "the orphan's new credential", func() (bool, error) {
		return envValue(t, volumeFile(t, orphan, "db", "pg.env"), "PGUSER") != orphanRole, nil
	})
	deletePod(t, rotatingNS, "orphan")
}

// envValue is the value of key in an env file's text.
func envValue(t *testing.T, env, key string) string {
	t.Helper()
	for _, line := range strings.Split(env, "\n") {
		if v, ok := strings.CutPrefix(line, key+"="); ok {
			return v
		}
	}
	t.Fatalf("no %s in the env file", key)
	return ""
}

// setDriverNodeSelector adds extra to the DaemonSet's node selector (nil:
// back to the chart's).
func setDriverNodeSelector(t *testing.T, extra map[string]string) {
	t.Helper()
	ctx := context.Background()
	dss := cluster.Clients.AppsV1().DaemonSets(node.Namespace)
	patch := `[{"op":"remove","path":"/spec/template/spec/nodeSelector/esc-test~1absent"}]`
	if extra != nil {
		patch = `{"spec":{"template":{"spec":{"nodeSelector":{"esc-test/absent":"true"}}}}}`
		if _, err := dss.Patch(ctx, "ephemeral-secrets-csi", types.StrategicMergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
			t.Fatal(err)
		}
		return
	}
	if _, err := dss.Patch(ctx, "ephemeral-secrets-csi", types.JSONPatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
}

// wipeVolumeState removes the driver's record and files of the pod's
// volumes from its state directory, as a reboot would.
func wipeVolumeState(t *testing.T, uid types.UID) {
	t.Helper()
	base := "/run/ephemeral-secrets-csi/volumes"
	entries, err := os.ReadDir(base)
	if err != nil {
		t.Fatal(err)
	}
	wiped := 0
	for _, e := range entries {
		dir := filepath.Join(base, e.Name())
		meta, err := os.ReadFile(filepath.Join(dir, "meta.json"))
		if err != nil || !strings.Contains(string(meta), string(uid)) {
			continue
		}
		for _, m := range harness.Mounts(dir) { // deepest first
			_ = unix.Unmount(m, unix.MNT_DETACH)
		}
		if err := os.RemoveAll(dir); err != nil {
			t.Fatal(err)
		}
		wiped++
	}
	if wiped == 0 {
		t.Fatalf("no state of pod %s in %s", uid, base)
	}
}
