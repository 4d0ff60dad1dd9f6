package realcluster

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/yaml"

	"github.com/ephemeral-secrets/csi-driver/pkg/apis/ephemeralsecrets/v1alpha1"
	"github.com/ephemeral-secrets/csi-driver/pkg/audit"
	"github.com/ephemeral-secrets/csi-driver/pkg/inventory"
	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/kube"
	"github.com/ephemeral-secrets/csi-driver/test/node"
)

// The thief: a pod of another namespace and service account, handed a
// copy of the example pod's files (by the test, through an emptyDir on
// the node: the copy is never printed nor stored in the API).
const (
	thiefNS = "elsewhere"
	thiefSA = "sidecar"
)

const thiefNamespace = `apiVersion: v1
kind: Namespace
metadata: {name: ` + thiefNS + `}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: ` + thiefSA + `, namespace: ` + thiefNS + `}
`

// thiefPod logs in with the stolen pg.env and holds its session in its
// first query.
const thiefPod = `apiVersion: v1
kind: Pod
metadata: {name: %s, namespace: ` + thiefNS + `}
spec:
  serviceAccountName: ` + thiefSA + `
  terminationGracePeriodSeconds: 1
  securityContext: {runAsUser: 1000, runAsGroup: 1000, runAsNonRoot: true}
  containers:
    - name: agent
      image: %s
      args: [--env-file=/stolen/pg.env, "--allowed=` + heldQuery + `", "--forbidden=SELECT count(*) FROM customers"]
      volumeMounts: [{name: stolen, mountPath: /stolen, readOnly: true}]
  volumes:
    - name: stolen
      emptyDir: {medium: Memory}
`

// heldQuery is the example's allowed query made to last ten minutes: a
// session shorter than the issuer's sampling interval may go unseen
// (db-check's logins last milliseconds), a held one cannot.
const heldQuery = "SELECT count(*) FROM orders, pg_sleep(600)"

// testCredentialUseAndTheft: the example pod's use of its credential is
// on its Credential within a sampling interval, its pod's address the
// only source. A pod of another service account logs in with a copy of
// its files: with onForeignUse alert (the default), the example pod gets
// a Warning event naming the thief's address, the Credential marks the
// address foreign and the issuer's audit has the record, and the
// credential still works; with revoke, the thief's session is ended, the
// role dropped and the example pod's files withdrawn (the time from the
// thief's login to its session's end is reported).
func testCredentialUseAndTheft(t *testing.T) {
	ctx := context.Background()
	pgAdmin, err := pgx.Connect(ctx, db.AdminURL())
	if err != nil {
		t.Fatal(err)
	}
	defer pgAdmin.Close(ctx)

	// The example, its query held open.
	applyExampleWith(t, "examples/postgres", strings.NewReplacer("--allowed=SELECT count(*) FROM orders", "--allowed="+heldQuery))
	defer deletePod(t, "ai-agents", "research-agent")
	pod := waitPod(t, "ai-agents", "research-agent", 2*time.Minute, corev1.PodRunning)
	role := exampleRole.FindStringSubmatch(waitLog(t, "ai-agents", "research-agent", "agent", time.Minute, exampleRole.String()))[1]
	env := volumeFile(t, pod, "db", "pg.env")
	harness.RememberSecret(envValue(t, env, "PGPASSWORD"))
	login := sessionOf(t, pgAdmin, role, pod.Status.PodIP)
	cred := credentialOf(t, pod)
	var used *v1alpha1.Credential
	seen := waitUntil(t, 30*time.Second, "the Credential's firstUsedAt", func() bool {
		used = getCredential(t, cred.Namespace, cred.Name)
		return used != nil && used.Status.FirstUsedAt != nil
	})
	report(t, "pod's login -> its Credential's firstUsedAt written", seen.Sub(login.start))
	st := used.Status
	if len(st.Sources) != 1 || st.Sources[0].Address != pod.Status.PodIP || st.Sources[0].Foreign ||
		!meta.IsStatusConditionTrue(st.Conditions, v1alpha1.ConditionUsed) || st.SourcesSummary != pod.Status.PodIP {
		t.Fatalf("the Credential's use: sources %+v (%q), conditions %+v; want its pod's address %s alone", st.Sources, st.SourcesSummary, st.Conditions, pod.Status.PodIP)
	}
	t.Logf("kubectl get creds -A:\n%s", kubectlGet(t, "creds", "-A"))

	// The thief, with onForeignUse alert.
	apply(t, thiefNamespace)
	defer func() { _ = cluster.Clients.CoreV1().Namespaces().Delete(ctx, thiefNS, metav1.DeleteOptions{}) }()
	startThief(t, "thief-alert", env)
	stolen := sessionFromElsewhere(t, pgAdmin, role, pod.Status.PodIP)
	thief := thiefWith(t, "thief-alert", stolen.addr)
	warned := waitUntil(t, 30*time.Second, "a CredentialUsedElsewhere event on the example pod", func() bool {
		return usedElsewhere(t, pod, thief.Status.PodIP, "alert") != nil
	})
	report(t, "thief's login -> Warning event on the pod (alert)", warned.Sub(stolen.start))
	ev := usedElsewhere(t, pod, thief.Status.PodIP, "alert")
	t.Logf("event %s: %s", ev.Reason, ev.Message)
	if !strings.Contains(ev.Message, cred.Name) || strings.Contains(ev.Message, envValue(t, env, "PGPASSWORD")) {
		t.Errorf("event message %q: want the Credential's name, never the password", ev.Message)
	}
	harness.Eventually(t, 30*time.Second, "the thief's address marked foreign on the Credential", func() (bool, error) {
		c := getCredential(t, cred.Namespace, cred.Name)
		return c != nil && slices.ContainsFunc(c.Status.Sources, func(s v1alpha1.Source) bool {
			return s.Address == thief.Status.PodIP && s.Foreign
		}), nil
	})
	harness.Eventually(t, 30*time.Second, "the issuer's audit record of the foreign use", func() (bool, error) {
		return len(foreignUseRecords(t, pod.Name, thief.Status.PodIP)) > 0, nil
	})
	t.Logf("kubectl get creds -A:\n%s", kubectlGet(t, "creds", "-A"))
	// Alerted, not revoked: the thief's session lives two intervals on.
	time.Sleep(3 * time.Second)
	if !sessionAlive(t, pgAdmin, stolen.pid) {
		t.Fatal("with onForeignUse alert the thief's session was ended")
	}
	deletePod(t, thiefNS, thief.Name)
	// Its session outlives it (the server notices a client gone only when
	// it next writes, and pg_sleep writes nothing): ended here, so that
	// the next thief's session is the one the revocation meets first.
	if _, err := pgAdmin.Exec(ctx, `SELECT pg_terminate_backend($1)`, stolen.pid); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 30*time.Second, "the first thief's session ended", func() bool { return !sessionAlive(t, pgAdmin, stolen.pid) })

	// The admin chooses revoke for the role; the issuer reads it at start.
	setOnForeignUse(t, "revoke")
	defer setOnForeignUse(t, "")
	defer issuerLogsOnFailure(t) // before the restore's restart loses them
	startThief(t, "thief-revoke", env)
	stolen = sessionFromElsewhere(t, pgAdmin, role, pod.Status.PodIP)
	thief = thiefWith(t, "thief-revoke", stolen.addr)
	ended := waitUntil(t, time.Minute, "the thief's session ended", func() bool { return !sessionAlive(t, pgAdmin, stolen.pid) })
	report(t, "thief's login -> its session ended (revoke)", ended.Sub(stolen.start))
	roleGone(t, role, time.Minute)
	dir := filepath.Join("/var/lib/kubelet/pods", string(pod.UID), "volumes/kubernetes.io~csi/db/mount")
	files := waitUntil(t, time.Minute, "the example pod's files withdrawn", func() bool {
		_, err := os.Stat(filepath.Join(dir, "password"))
		return errors.Is(err, os.ErrNotExist)
	})
	report(t, "thief's login -> the pod's files withdrawn (revoke)", files.Sub(stolen.start))
	if ev := usedElsewhere(t, pod, thief.Status.PodIP, "revoke"); ev == nil {
		t.Error("no CredentialUsedElsewhere event naming the thief's address and the revocation")
	} else {
		t.Logf("event %s: %s", ev.Reason, ev.Message)
	}
	if rs := foreignUseRecords(t, pod.Name, thief.Status.PodIP); len(rs) == 0 {
		t.Error("no audit record of the second foreign use")
	} else {
		b, _ := json.Marshal(rs[0])
		t.Logf("audit: %s", b)
	}
	if _, err := inventoryClient(t).Get(ctx, pod.Namespace, inventory.TombstoneName(string(pod.UID), volumeIDOf(t, cred))); err != nil {
		t.Errorf("no tombstone of the example pod's volume: %v", err)
	}
}

// session is a backend of pg_stat_activity.
type session struct {
	pid   int32
	start time.Time
	addr  string
}

// sessionOf waits for a session of role from addr and returns it.
func sessionOf(t *testing.T, pgAdmin *pgx.Conn, role, addr string) session {
	t.Helper()
	var s session
	waitUntil(t, 2*time.Minute, "a session of "+role+" from "+addr, func() bool {
		err := pgAdmin.QueryRow(context.Background(),
			`SELECT pid, backend_start FROM pg_stat_activity WHERE usename = $1 AND host(client_addr) = $2 ORDER BY backend_start LIMIT 1`,
			role, addr).Scan(&s.pid, &s.start)
		return err == nil
	})
	return s
}

func sessionAlive(t *testing.T, pgAdmin *pgx.Conn, pid int32) bool {
	t.Helper()
	var n int
	if err := pgAdmin.QueryRow(context.Background(), `SELECT count(*) FROM pg_stat_activity WHERE pid = $1`, pid).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n > 0
}

// waitUntil polls cond every 10 ms and returns when it first held.
func waitUntil(t *testing.T, timeout time.Duration, what string, cond func() bool) time.Time {
	t.Helper()
	for deadline := time.Now().Add(timeout); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if cond() {
			return time.Now()
		}
	}
	t.Fatalf("%s: not within %s", what, timeout)
	return time.Time{}
}

func getCredential(t *testing.T, ns, name string) *v1alpha1.Credential {
	t.Helper()
	c, err := inventoryClient(t).Get(context.Background(), ns, name)
	if err != nil {
		return nil
	}
	return c
}

func volumeIDOf(t *testing.T, c *v1alpha1.Credential) string {
	t.Helper()
	if c.Spec.VolumeID == "" {
		t.Fatalf("Credential %s names no volume", c.Name)
	}
	return c.Spec.VolumeID
}

func apply(t *testing.T, doc string) {
	t.Helper()
	if err := kube.Apply(context.Background(), cluster.Config(), []byte(doc), false); err != nil {
		t.Fatal(err)
	}
}

// sessionFromElsewhere waits for a session of role from an address other
// than ours (the example pod's), watching the database itself: a revoked
// thief's session may be born and ended before kubelet says its pod
// runs.
func sessionFromElsewhere(t *testing.T, pgAdmin *pgx.Conn, role, ours string) session {
	t.Helper()
	var s session
	waitUntil(t, 2*time.Minute, "a session of "+role+" from elsewhere than "+ours, func() bool {
		err := pgAdmin.QueryRow(context.Background(),
			`SELECT pid, backend_start, host(client_addr) FROM pg_stat_activity WHERE usename = $1 AND host(client_addr) <> $2 ORDER BY backend_start LIMIT 1`,
			role, ours).Scan(&s.pid, &s.start, &s.addr)
		return err == nil
	})
	return s
}

// thiefWith is the thief's pod, which must have the address addr.
func thiefWith(t *testing.T, name, addr string) *corev1.Pod {
	t.Helper()
	var p *corev1.Pod
	waitUntil(t, time.Minute, "the thief's pod's address", func() bool {
		var err error
		p, err = cluster.Clients.CoreV1().Pods(thiefNS).Get(context.Background(), name, metav1.GetOptions{})
		return err == nil && p.Status.PodIP != ""
	})
	if p.Status.PodIP != addr {
		t.Fatalf("the session from elsewhere came from %s, not the thief's pod (%q)", addr, p.Status.PodIP)
	}
	return p
}

// startThief starts a thief pod and hands it env (the stolen pg.env) in
// its emptyDir (memory: never on the node's disk) as soon as kubelet
// mounted it: db-check reads it at start (missing, it exits and kubelet
// starts it again).
func startThief(t *testing.T, name, env string) {
	t.Helper()
	ctx := context.Background()
	apply(t, fmt.Sprintf(thiefPod, name, node.DBCheckImage))
	var pod *corev1.Pod
	waitUntil(t, time.Minute, "the thief's pod has a UID", func() bool {
		p, err := cluster.Clients.CoreV1().Pods(thiefNS).Get(ctx, name, metav1.GetOptions{})
		pod = p
		return err == nil
	})
	dir := filepath.Join("/var/lib/kubelet/pods", string(pod.UID), "volumes/kubernetes.io~empty-dir/stolen")
	// Its tmpfs mounted (a file written before would be under it).
	waitUntil(t, time.Minute, "the thief's emptyDir", func() bool {
		_, fstype, _, ok := harness.MountOptions(dir)
		return ok && fstype == "tmpfs"
	})
	if err := os.WriteFile(filepath.Join(dir, "pg.env"), []byte(env), 0o644); err != nil {
		t.Fatal(err)
	}
}

// usedElsewhere is the CredentialUsedElsewhere event of pod naming addr
// and action, or nil.
func usedElsewhere(t *testing.T, pod *corev1.Pod, addr, action string) *corev1.Event {
	t.Helper()
	for _, e := range warnings(t, pod.Namespace, pod.Name) {
		if e.Reason == inventory.ReasonUsedElsewhere && e.InvolvedObject.UID == pod.UID &&
			strings.Contains(e.Message, addr) && strings.Contains(e.Message, "action "+action) {
			return &e
		}
	}
	return nil
}

// foreignUseRecords are the issuer replicas' audit records of stage use
// about the pod podName that name addr.
func foreignUseRecords(t *testing.T, podName, addr string) []audit.Record {
	t.Helper()
	pods, err := cluster.Clients.CoreV1().Pods(node.Namespace).List(context.Background(), metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=issuer"})
	if err != nil {
		t.Fatal(err)
	}
	var out []audit.Record
	for _, p := range pods.Items {
		if p.Status.Phase != corev1.PodRunning {
			continue
		}
		logs := podLogs(t, p.Namespace, p.Name, "issuer")
		keepLog(p.Name, logs)
		sc := bufio.NewScanner(strings.NewReader(logs))
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			var r audit.Record
			if json.Unmarshal(sc.Bytes(), &r) == nil && r.Stage == audit.Use && r.Pod.Name == podName && strings.Contains(r.Detail, addr) {
				out = append(out, r)
			}
		}
	}
	return out
}

// setOnForeignUse sets onForeignUse of the example's role in the issuer's
// backend Secret ("": the default) and restarts the issuer, which reads
// it at start; it returns once a new replica leads.
func setOnForeignUse(t *testing.T, action string) {
	t.Helper()
	ctx := context.Background()
	secrets := cluster.Clients.CoreV1().Secrets(node.Namespace)
	s, err := secrets.Get(ctx, "ephemeral-secrets-issuer", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var cfg map[string]any
	if err := yaml.Unmarshal(s.Data["backends.yaml"], &cfg); err != nil {
		t.Fatal(err)
	}
	r := cfg["postgres"].(map[string]any)["connections"].(map[string]any)["shop"].(map[string]any)["roles"].(map[string]any)["orders-reader"].(map[string]any)
	if action == "" {
		delete(r, "onForeignUse")
	} else {
		r["onForeignUse"] = action
	}
	if s.Data["backends.yaml"], err = yaml.Marshal(cfg); err != nil {
		t.Fatal(err)
	}
	if _, err := secrets.Update(ctx, s, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	restartIssuer(t)
}

// restartIssuer rolls the issuer's Deployment (kubectl rollout restart)
// and waits until a replica of the new generation leads.
func restartIssuer(t *testing.T) {
	t.Helper()
	ctx := context.Background()
	deps := cluster.Clients.AppsV1().Deployments(node.Namespace)
	at := time.Now().UTC().Format(time.RFC3339Nano)
	patch := `{"spec":{"template":{"metadata":{"annotations":{"esc-test/restarted-at":"` + at + `"}}}}}`
	if _, err := deps.Patch(ctx, "ephemeral-secrets-csi-issuer", types.StrategicMergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	var d *appsv1.Deployment
	harness.Eventually(t, 3*time.Minute, "the issuer rolled out", func() (bool, error) {
		var err error
		d, err = deps.Get(ctx, "ephemeral-secrets-csi-issuer", metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		s := d.Status
		return s.ObservedGeneration >= d.Generation && s.UpdatedReplicas == *d.Spec.Replicas && s.ReadyReplicas == *d.Spec.Replicas &&
			s.Replicas == *d.Spec.Replicas, nil
	})
	harness.Eventually(t, time.Minute, "a restarted issuer replica leads", func() (bool, error) {
		l, err := cluster.Clients.CoordinationV1().Leases(node.Namespace).Get(ctx, "ephemeral-secrets-csi-issuer", metav1.GetOptions{})
		if err != nil || l.Spec.HolderIdentity == nil {
			return false, err
		}
		p, err := cluster.Clients.CoreV1().Pods(node.Namespace).Get(ctx, *l.Spec.HolderIdentity, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		return p.Annotations["esc-test/restarted-at"] == at && p.DeletionTimestamp == nil, nil
	})
}

// kubectlGet runs the real kubectl get against the node's API server.
func kubectlGet(t *testing.T, args ...string) string {
	t.Helper()
	bin, err := harness.Tool("kubectl")
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(bin, append([]string{"--kubeconfig", cluster.Kubeconfig, "get"}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("kubectl get %v: %v\n%s", args, err, out)
	}
	return string(out)
}

// issuerLogsOnFailure prints what the issuer replicas logged of use (and
// keeps their logs for the secret search) when the test failed.
func issuerLogsOnFailure(t *testing.T) {
	t.Helper()
	if !t.Failed() {
		return
	}
	pods, err := cluster.Clients.CoreV1().Pods(node.Namespace).List(context.Background(), metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=issuer"})
	if err != nil {
		t.Log(err)
		return
	}
	for _, p := range pods.Items {
		b, err := cluster.Clients.CoreV1().Pods(p.Namespace).GetLogs(p.Name, &corev1.PodLogOptions{Container: "issuer"}).DoRaw(context.Background())
		if err != nil {
			continue
		}
		keepLog(p.Name, string(b))
		var lines []string
		for _, l := range strings.Split(string(b), "\n") {
			if strings.Contains(l, `"stage":"use"`) || strings.Contains(l, "tracker.go") || strings.Contains(l, "Leading") || strings.Contains(l, "kube.go") {
				lines = append(lines, l)
			}
		}
		t.Logf("issuer %s, its use lines:\n%s", p.Name, strings.Join(lines, "\n"))
	}
}
