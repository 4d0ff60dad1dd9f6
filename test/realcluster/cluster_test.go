package realcluster

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/ephemeral-secrets/csi-driver/pkg/audit"
	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/kube"
	"github.com/ephemeral-secrets/csi-driver/test/node"
)

// TestRealCluster runs the user's path in order; each step builds on the
// one before, so the first failure stops it.
func TestRealCluster(t *testing.T) {
	for _, step := range []struct {
		name string
		run  func(*testing.T)
	}{
		{"HelmInstall", testHelmInstall},
		{"PostgresExample", testPostgresExample},
		{"AgentTasksExample", testAgentTasksExample},
		{"Refusals", testRefusals},
		{"RotationAndRepublish", testRotationAndRepublish},
		{"DriverRestart", testDriverRestart},
		{"SurgeRollout", testSurgeRollout},
		{"DriverReach", testDriverReach},
		{"AdminCredentialOnlyInTheIssuer", testAdminCredentialOnlyInTheIssuer},
		{"InventoryAndKillSwitch", testInventoryAndKillSwitch},
		{"NodeLoss", testNodeLoss},
		{"CredentialUseAndTheft", testCredentialUseAndTheft},
		{"VaultExample", testVaultExample},
		{"UninstallLeavesNothing", testUninstallLeavesNothing},
		{"KustomizeInstall", testKustomizeInstall},
	} {
		if !t.Run(step.name, step.run) {
			t.FailNow()
		}
	}
}

// The test's own role beside the example's: a short TTL and maxTTL, so
// renewals and rotations happen within seconds.
const (
	rotatingNS = "team-rotate"
	rotatingSA = "agent"
)

func backends(t *testing.T) []byte {
	t.Helper()
	cfg, err := db.ExampleBackends(repoRoot)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := yaml.Unmarshal(cfg, &m); err != nil {
		t.Fatal(err)
	}
	roles := m["postgres"].(map[string]any)["connections"].(map[string]any)["shop"].(map[string]any)["roles"].(map[string]any)
	roles["rotating"] = map[string]any{
		"defaultTTL": "6s", "maxTTL": "14s",
		"creationStatements": []string{
			`CREATE ROLE "{{.Name}}" LOGIN PASSWORD '{{.Password}}' VALID UNTIL '{{.Expiration}}'`,
			`GRANT SELECT ON public.orders TO "{{.Name}}"`,
		},
		"allowed": []map[string]string{{"namespace": rotatingNS, "serviceAccount": rotatingSA}},
	}
	out, err := yaml.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func testHelmInstall(t *testing.T) {
	ctx := context.Background()
	start := time.Now()
	// Installed from a values file like a user's (the node's own images).
	if err := cluster.InstallDriver(ctx, repoRoot, backends(t), "-f", userValues()); err != nil {
		t.Fatal(err)
	}
	t.Logf("helm install to driver registered with kubelet: %s", time.Since(start).Round(time.Millisecond))
	harness.Eventually(t, time.Minute, "the DaemonSet's pod ready", func() (bool, error) {
		ds, err := cluster.Clients.AppsV1().DaemonSets(node.Namespace).Get(ctx, "ephemeral-secrets-csi", metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		if ds.Status.NumberReady != 1 {
			return false, fmt.Errorf("%d ready", ds.Status.NumberReady)
		}
		return true, nil
	})
	if _, err := cluster.Clients.StorageV1().CSIDrivers().Get(ctx, "ephemeral-secrets.csi.dev", metav1.GetOptions{}); err != nil {
		t.Fatalf("CSIDriver: %v", err)
	}
	p := driverPod(t)
	if p.Labels["cost-center"] != "secrets" || p.Labels["team"] != "platform" || p.Spec.NodeSelector["kubernetes.io/os"] != "linux" ||
		len(p.Spec.ImagePullSecrets) != 1 || !slices.Contains(p.Spec.Containers[0].Args, "--sweep-interval=30s") {
		t.Fatalf("the values file did not reach the driver's pod: labels %v, selector %v, pull secrets %v, args %v",
			p.Labels, p.Spec.NodeSelector, p.Spec.ImagePullSecrets, p.Spec.Containers[0].Args)
	}
}

// userValues is the values file the suite installs the chart with.
func userValues() string { return filepath.Join(repoRoot, "test/realcluster/testdata/values.yaml") }

// The example's role name prefix (esc_<namespace>_<service account>_).
var exampleRole = regexp.MustCompile(`user=(esc_ai_agents_research_agent_[a-z0-9_]+)`)

func testPostgresExample(t *testing.T) {
	ctx := context.Background()
	created := time.Now()
	applyExample(t, "examples/postgres")
	pod := waitPod(t, "ai-agents", "research-agent", 2*time.Minute, corev1.PodRunning)
	t.Logf("example pod Running %s after apply", time.Since(created).Round(time.Millisecond))
	// db-check logged in with the files, read orders and was refused customers.
	waitLog(t, "ai-agents", "research-agent", "agent", time.Minute, `forbidden query refused: .*customers.*42501`)
	logs := podLogs(t, "ai-agents", "research-agent", "agent")
	for _, want := range []string{"login ok: user=esc_ai_agents_research_agent_", "allowed query ok: SELECT count(*) FROM orders: 1 row(s), first: 2"} {
		if !strings.Contains(logs, want) {
			t.Fatalf("db-check log lacks %q:\n%s", want, logs)
		}
	}
	m := exampleRole.FindStringSubmatch(logs)
	if m == nil {
		t.Fatalf("no role in the log:\n%s", logs)
	}
	role := m[1]
	harness.RememberSecret(volumeFile(t, pod, "db", "password"))

	// Files as the pod sees them: root:fsGroup 0440 on a read-only tmpfs.
	dir := filepath.Join("/var/lib/kubelet/pods", string(pod.UID), "volumes/kubernetes.io~csi/db/mount")
	opts, fstype, _, ok := harness.MountOptions(dir)
	if !ok || fstype != "tmpfs" || !contains(opts, "ro") {
		t.Fatalf("volume mount: ok=%v fstype=%s opts=%v", ok, fstype, opts)
	}
	fi, err := os.Stat(filepath.Join(dir, "db.json"))
	if err != nil {
		t.Fatal(err)
	}
	if st := fi.Sys().(*syscallStat); fi.Mode().Perm() != 0o440 || st.Gid != 2000 || st.Uid != 0 {
		t.Fatalf("db.json: mode %v owner %d:%d, want 0440 root:2000", fi.Mode().Perm(), st.Uid, st.Gid)
	}
	if ok, _ := db.RoleExists(ctx, role); !ok {
		t.Fatalf("role %s not in pg_roles", role)
	}

	// A session opened with the pod's credential, held across the delete:
	// the revocation ends it (the admin is not a superuser).
	held, err := pgx.Connect(ctx, db.URLFor(role, volumeFile(t, pod, "db", "password"), "shop"))
	if err != nil {
		t.Fatalf("a session with the pod's credential: %v", err)
	}
	defer held.Close(context.Background())

	// Deleting the pod drops the role; time from the delete call.
	start := time.Now()
	if err := cluster.Clients.CoreV1().Pods("ai-agents").Delete(ctx, "research-agent", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	gone := roleGone(t, role, 2*time.Minute)
	report(t, "pod delete -> role dropped", gone.Sub(start))
	if err := held.Ping(ctx); err == nil {
		t.Fatal("a session of the dropped role still answers")
	}
	rs := auditRecords(t, driverPod(t))
	if n := len(recordsOf(rs, "research-agent", audit.Issue)); n != 1 {
		t.Fatalf("%d issue records for the example pod, want 1", n)
	}
	if n := len(recordsOf(rs, "research-agent", audit.Revoke)); n < 1 {
		t.Fatal("no revoke record for the example pod")
	}
	deletePod(t, "ai-agents", "research-agent")
}

// report logs a measured figure in a form the README's table quotes.
func report(t *testing.T, what string, d time.Duration) {
	t.Helper()
	t.Logf("MEASURED %s: %s", what, d.Round(time.Millisecond))
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// testRefusals: a pod whose class does not exist, and one whose service
// account is not allowed, each stay ContainerCreating with our Warning
// event, as kubectl describe pod shows it.
func testRefusals(t *testing.T) {
	ctx := context.Background()
	mk := func(name, sa, class string) {
		if err := kube.Apply(ctx, cluster.Config(), []byte(fmt.Sprintf(podTemplate, name, "ai-agents", sa, node.DBCheckImage, class)), false); err != nil {
			t.Fatal(err)
		}
	}
	if err := kube.Apply(ctx, cluster.Config(), []byte("apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: intruder, namespace: ai-agents}\n"), false); err != nil {
		t.Fatal(err)
	}
	mk("no-class", "research-agent", "does-not-exist")
	mk("not-allowed", "intruder", "orders-db")
	for _, c := range []struct{ pod, reason, says string }{
		{"no-class", "SecretProviderClassNotFound", "does-not-exist"},
		{"not-allowed", "", "intruder"},
	} {
		harness.Eventually(t, 90*time.Second, c.pod+"'s warning event", func() (bool, error) {
			for _, e := range warnings(t, "ai-agents", c.pod) {
				if (c.reason == "" || e.Reason == c.reason) && strings.Contains(e.Message, c.says) && e.Source.Component != "kubelet" {
					return true, nil
				}
			}
			return false, nil
		})
		p, err := cluster.Clients.CoreV1().Pods("ai-agents").Get(ctx, c.pod, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if p.Status.Phase != corev1.PodPending || len(p.Status.ContainerStatuses) == 0 ||
			p.Status.ContainerStatuses[0].State.Waiting == nil || p.Status.ContainerStatuses[0].State.Waiting.Reason != "ContainerCreating" {
			t.Fatalf("%s: phase %s, statuses %+v; want Pending in ContainerCreating", c.pod, p.Status.Phase, p.Status.ContainerStatuses)
		}
		// kubelet's own FailedMount event carries our message too.
		harness.Eventually(t, 90*time.Second, c.pod+"'s FailedMount event with our message", func() (bool, error) {
			for _, e := range warnings(t, "ai-agents", c.pod) {
				if e.Reason == "FailedMount" && strings.Contains(e.Message, c.says) {
					return true, nil
				}
			}
			return false, nil
		})
	}
	if n, err := db.CountRoles(ctx, "esc_ai_agents_intruder"); err != nil || n != 0 {
		t.Fatalf("roles for the refused service account: %d (%v)", n, err)
	}
	for _, p := range []string{"no-class", "not-allowed"} {
		deletePod(t, "ai-agents", p)
	}
}

// podTemplate is a db-check pod: name, namespace, service account, image, class.
const podTemplate = `apiVersion: v1
kind: Pod
metadata: {name: %s, namespace: %s}
spec:
  serviceAccountName: %s
  terminationGracePeriodSeconds: 2
  securityContext: {fsGroup: 2000, runAsUser: 1000, runAsGroup: 1000, runAsNonRoot: true}
  containers:
    - name: agent
      image: %s
      args: [--env-file=/run/secrets/db/pg.env, "--allowed=SELECT count(*) FROM orders", "--forbidden=SELECT count(*) FROM customers", --hold=2s]
      volumeMounts: [{name: db, mountPath: /run/secrets/db, readOnly: true}]
  volumes:
    - name: db
      csi: {driver: ephemeral-secrets.csi.dev, readOnly: true, volumeAttributes: {secretProviderClass: %s}}
`

const rotatingClass = `apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata: {name: rotating, namespace: ` + rotatingNS + `}
spec:
  provider: postgres
  parameters:
    connection: shop
    role: rotating
    files: |
      - path: pg.env
        template: |
          PGHOST={{ .host }}
          PGPORT={{ .port }}
          PGDATABASE={{ .database }}
          PGUSER={{ .username }}
          PGPASSWORD={{ .password }}
---
apiVersion: v1
kind: Namespace
metadata: {name: ` + rotatingNS + `}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: ` + rotatingSA + `, namespace: ` + rotatingNS + `}
`

func startRotatingPod(t *testing.T, name string) *corev1.Pod {
	t.Helper()
	ctx := context.Background()
	// The namespace first, then the rest (Apply creates in order).
	docs := strings.Split(rotatingClass, "---\n")
	for _, d := range []string{docs[1], docs[2], docs[0], fmt.Sprintf(podTemplate, name, rotatingNS, rotatingSA, node.DBCheckImage, "rotating")} {
		if err := kube.Apply(ctx, cluster.Config(), []byte(d), false); err != nil {
			t.Fatal(err)
		}
	}
	return waitPod(t, rotatingNS, name, 2*time.Minute, corev1.PodRunning)
}

// testRotationAndRepublish: a long-running pod with a short TTL and a
// small maxTTL sees its files rotate in place and keeps working with the
// new credential; kubelet's real republishes mint nothing.
func testRotationAndRepublish(t *testing.T) {
	pod := startRotatingPod(t, "rotating")
	before := scrape(t)
	// Two rotations: three distinct users logged in, the container never restarted.
	users := map[string]bool{}
	rx := regexp.MustCompile(`login ok: user=(esc_team_rotate_[a-z0-9_]+)`)
	harness.Eventually(t, 90*time.Second, "db-check logged in as three rotated roles", func() (bool, error) {
		for _, m := range rx.FindAllStringSubmatch(podLogs(t, rotatingNS, "rotating", "agent"), -1) {
			users[m[1]] = true
		}
		return len(users) >= 3, nil
	})
	p, err := cluster.Clients.CoreV1().Pods(rotatingNS).Get(context.Background(), "rotating", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if cs := p.Status.ContainerStatuses; len(cs) != 1 || cs[0].RestartCount != 0 || cs[0].State.Running == nil {
		t.Fatalf("db-check restarted or stopped: %+v (a login failed after a rotation)", cs)
	}
	if logs := podLogs(t, rotatingNS, "rotating", "agent"); strings.Contains(logs, "FAILED") {
		t.Fatalf("db-check saw a failure:\n%s", logs)
	}
	// kubelet republishes at its pod syncs (requiresRepublish): wait for two.
	publishSeries := `ephemeral_secrets_csi_operation_duration_seconds_count{code="OK",method="NodePublishVolume"}`
	var after metricsSample
	harness.Eventually(t, 2*time.Minute, "two republishes from kubelet", func() (bool, error) {
		after = scrape(t)
		return after.get(publishSeries)-before.get(publishSeries) >= 2, nil
	})
	publishes := after.get(publishSeries) - before.get(publishSeries)
	issues := after.get(`ephemeral_secrets_lease_operations_total{operation="issue",outcome="success",provider="postgres"}`) -
		before.get(`ephemeral_secrets_lease_operations_total{operation="issue",outcome="success",provider="postgres"}`)
	rotations := after.get(`ephemeral_secrets_lease_operations_total{operation="rotate",outcome="success",provider="postgres"}`) -
		before.get(`ephemeral_secrets_lease_operations_total{operation="rotate",outcome="success",provider="postgres"}`)
	t.Logf("while the pod ran: %v NodePublishVolume calls from kubelet, %v issues, %v rotations", publishes, issues, rotations)
	if issues != 0 {
		t.Fatalf("%v issues while the pod ran: a republish minted a credential", issues)
	}
	if rotations < 2 {
		t.Fatalf("%v rotations, want at least 2", rotations)
	}
	rs := auditRecords(t, driverPod(t))
	if n := len(recordsOf(rs, "rotating", audit.Issue)); n != 1 {
		t.Fatalf("%d issue records for the rotating pod, want 1", n)
	}
	harness.RememberSecret(volumeFile(t, pod, "db", "pg.env")[strings.Index(volumeFile(t, pod, "db", "pg.env"), "PGPASSWORD=")+len("PGPASSWORD="):])
}

// metricsSample is one scrape of the driver's /metrics.
type metricsSample map[string]float64

func (m metricsSample) get(series string) float64 { return m[series] }

// scrape reads the driver pod's metrics.
func scrape(t *testing.T) metricsSample {
	t.Helper()
	resp, err := http.Get("http://" + net.JoinHostPort(driverPod(t).Status.PodIP, "9810") + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	keepLog("metrics-"+strconv.FormatInt(time.Now().UnixNano(), 36), string(b))
	out := metricsSample{}
	for _, line := range strings.Split(string(b), "\n") {
		if line == "" || line[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if v, err := strconv.ParseFloat(line[i+1:], 64); err == nil {
			out[line[:i]] = v
		}
	}
	return out
}
