package alerts

import (
	"context"
	"encoding/json"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	v1alpha1 "github.com/ephemeral-secrets/csi-driver/pkg/apis/ephemeralsecrets/v1alpha1"
	"github.com/ephemeral-secrets/csi-driver/pkg/inventory"
	"github.com/ephemeral-secrets/csi-driver/pkg/issuer/remote"
	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/issuertest"
	"github.com/ephemeral-secrets/csi-driver/test/kube"
	"github.com/ephemeral-secrets/csi-driver/test/kubelet"
)

var chartDir = filepath.Join("..", "..", "deploy", "helm", "ephemeral-secrets-csi")

// node is the node plugin's node (harness.Driver's --node-id).
const node = "test-node"

// Every scrape is a minute of virtual time; the real ones are a second
// apart: ages are multiplied by 60.
const (
	virtualStep = time.Minute
	realStep    = time.Second
)

// rendered is what the chart renders with monitoring on: the rules of
// its PrometheusRule, and the job each ServiceMonitor gives its targets,
// by component (node, issuer). It fails the test unless the node
// plugins' ServiceMonitor puts the node's name in "node".
func rendered(t *testing.T) (Rules, map[string]string) {
	t.Helper()
	helm, err := kube.Tool("helm")
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(helm, "template", "esc", chartDir, "--namespace", issuertest.IssuerNamespace,
		"--kube-version", "1.37.0", "--set", "monitoring.enabled=true,providers.postgres.enabled=true").CombinedOutput()
	if err != nil {
		t.Fatalf("helm template: %v\n%s", err, out)
	}
	objects, err := kube.Decode(out)
	if err != nil {
		t.Fatal(err)
	}
	var rules Rules
	jobs, nodeLabel := map[string]string{}, map[string]bool{}
	for _, o := range objects {
		switch o.GetKind() {
		case "PrometheusRule":
			b, err := json.Marshal(o.Object["spec"])
			if err != nil {
				t.Fatal(err)
			}
			if err := json.Unmarshal(b, &rules); err != nil {
				t.Fatal(err)
			}
		case "ServiceMonitor":
			component := o.GetLabels()["app.kubernetes.io/component"]
			eps, _, _ := unstructured.NestedSlice(o.Object, "spec", "endpoints")
			if len(eps) != 1 {
				t.Fatalf("ServiceMonitor %s: %d endpoints", o.GetName(), len(eps))
			}
			rls, _, _ := unstructured.NestedSlice(eps[0].(map[string]any), "relabelings")
			for _, r := range rls {
				r := r.(map[string]any)
				src, _, _ := unstructured.NestedStringSlice(r, "sourceLabels")
				switch r["targetLabel"] {
				case "job":
					jobs[component], _ = r["replacement"].(string)
				case "node":
					nodeLabel[component] = slices.Equal(src, []string{"__meta_kubernetes_pod_node_name"})
				}
			}
		}
	}
	if len(rules.Alerts()) == 0 || jobs["node"] == "" || jobs["issuer"] == "" || !nodeLabel["node"] {
		t.Fatalf("rendered: %d alerts, jobs %v, node label on the node plugins' series %v", len(rules.Alerts()), jobs, nodeLabel["node"])
	}
	return rules, jobs
}

// record scrapes the targets n times, realStep apart, calling before(i)
// ahead of scrape i when before is set.
func record(targets []Target, n int, before func(i int)) *Recording {
	r := &Recording{
		Interval: virtualStep, Dilation: float64(virtualStep / realStep),
		Ages: []string{"ephemeral_secrets_revocation_queue_oldest_seconds", "ephemeral_secrets_inventory_revoking_oldest_seconds"},
		Keep: func(name string) bool { return strings.HasPrefix(name, "ephemeral_secrets_") },
	}
	start := time.Now()
	for i := range n {
		time.Sleep(time.Until(start.Add(time.Duration(i) * realStep)))
		if before != nil {
			before(i)
		}
		r.Scrape(targets)
	}
	return r
}

func issuerTarget(is *issuertest.Issuer, job string) Target {
	return Target{URL: "http://" + is.Metrics + "/metrics", Labels: map[string]string{"job": job, "instance": is.Metrics, "pod": is.ID}}
}

// startIssuer starts a replica and waits until it serves its metrics
// and is ready.
func startIssuer(t *testing.T, id string, flags ...string) *issuertest.Issuer {
	t.Helper()
	return startIssuerWith(t, id, backends, flags...)
}

// startIssuerWith is startIssuer with the backend file given.
func startIssuerWith(t *testing.T, id, backends string, flags ...string) *issuertest.Issuer {
	t.Helper()
	is, err := issuertest.StartIssuer(bin, id, "", issuerKubeconfig, backends, flags...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(is.Stop)
	harness.Eventually(t, 60*time.Second, id+" ready", func() (bool, error) {
		if is.Exited() {
			b, _ := os.ReadFile(is.LogFile)
			t.Fatalf("%s exited:\n%s", id, b)
		}
		resp, err := client.Get("http://" + is.Metrics + "/readyz")
		if err != nil {
			return false, nil
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK, nil
	})
	return is
}

const classes = `apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: orders-db
  namespace: shop
spec:
  provider: postgres
  parameters:
    connection: main
    role: app
---
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: orders-db
  namespace: lab
spec:
  provider: postgres
  parameters:
    connection: main
    role: app
`

// startDriver starts the node plugin asking is, retrying a failed
// revocation at least every second, two live credentials at most in a
// namespace.
func startDriver(t *testing.T, is *issuertest.Issuer) (*harness.Driver, *kubelet.Kubelet) {
	t.Helper()
	ctx := context.Background()
	env, err := harness.NewEnv()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = env.Close() })
	dp, err := objs.Node(ctx, node)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := objs.Token(ctx, dp, remote.Audience)
	if err != nil {
		t.Fatal(err)
	}
	tokenFile, err := issuertest.WriteToken(env.Base, "issuer-token", tok)
	if err != nil {
		t.Fatal(err)
	}
	classFile := filepath.Join(env.Base, "classes.yaml")
	if err := os.WriteFile(classFile, []byte(classes), 0o600); err != nil {
		t.Fatal(err)
	}
	drv := &harness.Driver{Bin: nodeBin, Env: env, LogFile: harness.LogPath("node"), Args: []string{
		"--classes-file", classFile, "--kubeconfig", driverKubeconfig, "--audit-log", harness.LogPath("node-audit"),
		"--issuer-address", is.URL(), "--issuer-token-file", tokenFile,
		"--issuer-ca-configmap", issuertest.IssuerNamespace + "/ephemeral-secrets-csi-issuer-ca",
		"--retry-min=100ms", "--retry-max=1s", "--backend-timeout=5s", "--max-leases-per-namespace=2",
	}}
	if err := drv.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		drv.Stop()
		if t.Failed() {
			t.Logf("driver log:\n%s", drv.LogTail(4000))
		}
	})
	k, err := kubelet.Dial(env.Endpoint(), env.KubeletDir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = k.Close() })
	return drv, k
}

var volume = kubelet.Volume{Name: issuertest.VolumeName, ReadOnly: true, Attributes: map[string]string{"secretProviderClass": "orders-db"}}

// tenant makes a pod of shop/orders on the node, in the API.
func tenant(t *testing.T, name string) kubelet.Pod {
	t.Helper()
	return tenantOf(t, "shop", "orders", name)
}

// tenantOf makes a pod of namespace/serviceAccount on the node, in the API.
func tenantOf(t *testing.T, namespace, serviceAccount, name string) kubelet.Pod {
	t.Helper()
	p, _, err := objs.TenantPod(context.Background(), namespace, name, serviceAccount, node, "orders-db")
	if err != nil {
		t.Fatal(err)
	}
	return kubelet.Pod{Namespace: p.Namespace, Name: p.Name, UID: p.UID, ServiceAccount: p.ServiceAccount}
}

// publish publishes pod's volume and returns the role it got.
func publish(t *testing.T, k *kubelet.Kubelet, pod kubelet.Pod) string {
	t.Helper()
	target, err := k.Publish(context.Background(), pod, volume)
	if err != nil {
		t.Fatalf("publish %s: %v", pod.Name, err)
	}
	for _, f := range []string{"password", "username"} {
		b, err := os.ReadFile(filepath.Join(target, f))
		if err != nil {
			t.Fatal(err)
		}
		if f == "password" {
			harness.RememberSecret(string(b))
			continue
		}
		return string(b)
	}
	return ""
}

func roleGone(t *testing.T, role string) {
	t.Helper()
	harness.Eventually(t, 60*time.Second, "role "+role+" dropped", func() (bool, error) {
		ok, err := pg.RoleExists(context.Background(), role)
		return !ok, err
	})
}

// Each alert, run by promtool on series scraped from the real node plugin
// and issuer (against a real PostgreSQL and kube-apiserver): none fires
// while all is well (where the issue-rate rule sees a service account's
// issues); each fires, with its labels, when its condition is
// made real: PostgreSQL down (issue and revoke errors on the node and in
// the issuer, a Credential held in Revoking, the reaper failing, sessions
// unseen), tenants refused (first requests, authorization failures, a
// namespace's cap; no error alert), the processes down, no leader, no
// node plugin at all.
func TestAlertsOnRealMetrics(t *testing.T) {
	promtool, err := harness.Tool("promtool")
	if err != nil {
		t.Fatal(err)
	}
	rules, jobs := rendered(t)
	ctx := context.Background()
	inv, err := inventory.NewClient(cluster.Config())
	if err != nil {
		t.Fatal(err)
	}

	is := startIssuer(t, "issuer-1", "--reap-interval=1s", "--retry-max=1s")
	harness.Eventually(t, 60*time.Second, "issuer-1 leads", func() (bool, error) { return is.Leading() })
	drv, k := startDriver(t, is)
	driver := Target{URL: "http://" + drv.MetricsAddr + "/metrics", Labels: map[string]string{"job": jobs["node"], "node": node, "instance": drv.MetricsAddr}}
	both := []Target{driver, issuerTarget(is, jobs["issuer"])}

	// Healthy: a credential issued and revoked, two live; the last two
	// issued 4 and 3 steps before the end (under the namespace's cap of
	// two), so that their service account's issue rate is above zero,
	// under the anomaly's floor.
	a, b, c := tenant(t, "orders-a"), tenant(t, "orders-b"), tenant(t, "orders-c")
	roleB := publish(t, k, b)
	var roleA, roleC string
	healthy := record(both, 30, func(i int) {
		switch i {
		case 26:
			roleA = publish(t, k, a)
			if err := k.Unpublish(ctx, a, volume.Name); err != nil {
				t.Fatal(err)
			}
		case 27:
			roleC = publish(t, k, c)
		}
	})
	roleGone(t, roleA)

	// PostgreSQL down: b's Credential deleted (the kill switch), c's
	// volume unpublished, d's publish tried at every step.
	d := tenant(t, "orders-d")
	publishes, failed := 0, 0
	down := record(both, 30, func(i int) {
		if i == 1 {
			pg.Stop()
			recs, err := inv.List(ctx, "shop", metav1.ListOptions{LabelSelector: v1alpha1.LabelPodUID + "=" + b.UID})
			if err != nil || len(recs.Items) != 1 {
				t.Fatalf("b's records: %v, %v", recs, err)
			}
			if err := inv.Delete(ctx, "shop", recs.Items[0].Name, metav1.DeleteOptions{}); err != nil {
				t.Fatal(err)
			}
			if err := k.Unpublish(ctx, c, volume.Name); err != nil {
				t.Fatal(err)
			}
		}
		if i >= 1 {
			pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			defer cancel()
			publishes++
			if _, err := k.Publish(pctx, d, volume); err != nil {
				failed++
			}
		}
	})
	if failed != publishes {
		t.Errorf("%d of %d publishes failed with PostgreSQL down", failed, publishes)
	}
	// Back up, everything left is revoked.
	if err := pg.Restart(); err != nil {
		t.Fatal(err)
	}
	roleGone(t, roleB)
	roleGone(t, roleC)
	harness.Eventually(t, 60*time.Second, "no Credential left in Revoking", func() (bool, error) {
		recs, err := inv.List(ctx, "shop", metav1.ListOptions{})
		if err != nil {
			return false, err
		}
		for _, r := range recs.Items {
			if r.DeletionTimestamp != nil {
				return false, nil
			}
		}
		return true, nil
	})

	// Tenants refused: a service account the class does not allow asks
	// twice a step, a namespace past its cap of two live credentials once,
	// both for the first time on the node. No error alert fires: a tenant
	// cannot page anyone with a refusal.
	intruder := tenantOf(t, "shop", "intruder", "intruder")
	l1, l2, l3 := tenantOf(t, "lab", "agents", "agent-1"), tenantOf(t, "lab", "agents", "agent-2"), tenantOf(t, "lab", "agents", "agent-3")
	refused := 0
	tenants := record(both, 9, func(i int) {
		if i == 0 {
			return
		}
		if i == 1 {
			publish(t, k, l1)
			publish(t, k, l2)
		}
		for _, p := range []kubelet.Pod{intruder, intruder, l3} {
			if _, err := k.Publish(ctx, p, volume); status.Code(err) == codes.PermissionDenied || status.Code(err) == codes.ResourceExhausted {
				refused++
			} else {
				t.Errorf("publish of %s/%s: %v, want a refusal", p.Namespace, p.Name, err)
			}
		}
	})
	if refused != 3*8 {
		t.Errorf("%d refusals, want %d", refused, 3*8)
	}

	// The node plugin and the issuer stopped: their targets do not answer.
	drv.Stop()
	is.Stop()
	stopped := record(both, 8, nil)

	// The DaemonSet gone (no node plugin target at all), and an issuer
	// replica that cannot take the leader Lease (its RBAC names another).
	is2 := startIssuer(t, "issuer-2", "--leader-election-lease=ephemeral-secrets-csi-issuer-not-allowed")
	leaderless := record([]Target{issuerTarget(is2, jobs["issuer"])}, 12, nil)

	nodeLabels := map[string]string{"node": node}
	cases := []Case{
		// The issue-rate rule reads the node plugin's real series: the
		// pods' namespace and service account, summed over nodes.
		{Name: "healthy", Recording: healthy, Exprs: []Expr{{Expr: rateRule + " > bool 0",
			Samples: []Sample{{Labels: `{namespace="shop",service_account="orders"}`, Value: 1}}}}},
		{Name: "postgres down", Recording: down, Firing: map[string][]map[string]string{
			"EphemeralSecretsIssueFailing":            {nodeLabels},
			"EphemeralSecretsRevocationFailing":       {{"node": node, "provider": "postgres"}},
			"EphemeralSecretsRevocationQueuedTooLong": {nodeLabels},
			"EphemeralSecretsReapFailing":             {{}},
			"EphemeralSecretsIssuerIssueFailing":      {{}},
			"EphemeralSecretsIssuerRevocationFailing": {{}},
			"EphemeralSecretsCredentialStuckRevoking": {{}},
			// Sampling fails too: no use is seen while it is down.
			"EphemeralSecretsIssuerCannotSeeSessions": {{"connection": "main"}},
		}},
		{Name: "tenants refused", Recording: tenants, Firing: map[string][]map[string]string{
			"EphemeralSecretsFirstSeenRequest":          {{"node": node, "namespace": "shop"}, {"node": node, "namespace": "lab"}},
			"EphemeralSecretsAuthorizationFailureSpike": {nodeLabels},
			"EphemeralSecretsTenantLimitReached":        {{"node": node, "namespace": "lab", "limit": "namespace_leases"}},
		}},
		{Name: "processes down", Recording: stopped, Firing: map[string][]map[string]string{
			"EphemeralSecretsDriverDown": {nodeLabels},
			"EphemeralSecretsIssuerDown": {{}},
		}},
		{Name: "no leader, no node plugin", Recording: leaderless, Firing: map[string][]map[string]string{
			"EphemeralSecretsDriverAbsent":   {{"job": jobs["node"]}},
			"EphemeralSecretsIssuerNoLeader": {{}},
		}},
	}
	dir := t.TempDir()
	out, err := TestRules(promtool, dir, rules, cases)
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	t.Logf("promtool:\n%s", out)
}
