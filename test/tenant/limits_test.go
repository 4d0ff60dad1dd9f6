package tenant

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/kube"
	"github.com/ephemeral-secrets/csi-driver/test/kubelet"
)

// limitsFixture is a driver that sends its events to a real API server.
type limitsFixture struct {
	*fixture
	clients *kubernetes.Clientset
}

func startWithEvents(t *testing.T, extra ...string) *limitsFixture {
	t.Helper()
	c := realCluster(t)
	clients, err := kubernetes.NewForConfig(c.Config())
	if err != nil {
		t.Fatal(err)
	}
	for _, ns := range []string{"team-a", "team-b"} {
		_, err := clients.CoreV1().Namespaces().Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
		if err != nil && !apierrors.IsAlreadyExists(err) {
			t.Fatal(err)
		}
	}
	env := newEnv(t)
	classes := class("team-a", "db", "postgres", pgParams(nil)) + "---\n" + class("team-b", "db", "postgres", pgParams(nil))
	args := append([]string{"--kubeconfig", kubeconfig(t, c, env.Base),
		// client-go traces requests from -v=6, and the tracer races with itself under -race.
		"-v", "5"}, extra...)
	return &limitsFixture{fixture: start(t, env, classes, pgBackend(), args...), clients: clients}
}

func kubeconfig(t *testing.T, c *kube.Cluster, dir string) string {
	t.Helper()
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["test"] = &clientcmdapi.Cluster{Server: c.URL, CertificateAuthorityData: c.CAPEM}
	cfg.AuthInfos["admin"] = &clientcmdapi.AuthInfo{Token: kube.AdminToken}
	cfg.Contexts["test"] = &clientcmdapi.Context{Cluster: "test", AuthInfo: "admin"}
	cfg.CurrentContext = "test"
	path := filepath.Join(dir, "kubeconfig")
	if err := clientcmd.WriteToFile(*cfg, path); err != nil {
		t.Fatal(err)
	}
	return path
}

// refused publishes a new volume and expects ResourceExhausted naming flag.
func (f *limitsFixture) refused(t *testing.T, p kubelet.Pod, flag string) {
	t.Helper()
	_, err := f.kube.Publish(context.Background(), p, volume("db"))
	if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), flag) {
		t.Fatalf("%s/%s: %v, want ResourceExhausted naming %s", p.Namespace, p.Name, err, flag)
	}
	assertNoTarget(t, f.fixture, p)
}

func (f *limitsFixture) publish(t *testing.T, p kubelet.Pod) {
	t.Helper()
	if _, err := f.kube.Publish(context.Background(), p, volume("db")); err != nil {
		t.Fatalf("%s/%s: %v", p.Namespace, p.Name, err)
	}
}

// roles expects exactly n live roles: nothing was created past a limit.
func roles(t *testing.T, n int) {
	t.Helper()
	got, err := pg.CountRoles(context.Background(), "esc_")
	if err != nil || got != n {
		t.Fatalf("%d roles (%v), want %d", got, err, n)
	}
}

func assertNoTarget(t *testing.T, f *fixture, p kubelet.Pod) {
	t.Helper()
	if m := harness.Mounts(filepath.Join(f.env.KubeletDir, "pods", p.UID)); len(m) != 0 {
		t.Errorf("mounts left: %v", m)
	}
}

// event waits for the TenantLimitReached warning on the pod.
func (f *limitsFixture) event(t *testing.T, p kubelet.Pod, says string) {
	t.Helper()
	harness.Eventually(t, 15*time.Second, "TenantLimitReached event on "+p.Name, func() (bool, error) {
		evs, err := f.clients.CoreV1().Events(p.Namespace).List(context.Background(), metav1.ListOptions{})
		if err != nil {
			return false, err
		}
		for _, e := range evs.Items {
			if e.InvolvedObject.Name == p.Name && e.Type == corev1.EventTypeWarning && e.Reason == "TenantLimitReached" {
				if !strings.Contains(e.Message, says) {
					t.Errorf("event message %q does not say %q", e.Message, says)
				}
				return true, nil
			}
		}
		return false, nil
	})
}

func (f *limitsFixture) refusalsMetric(t *testing.T, want string) {
	t.Helper()
	_, body, err := f.driver.Scrape("/metrics")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(body, want) {
		t.Errorf("metrics lack %s", want)
	}
}

func (f *limitsFixture) unpublishAll(t *testing.T, pods ...kubelet.Pod) {
	t.Helper()
	for _, p := range pods {
		if err := f.kube.Unpublish(context.Background(), p, "secrets"); err != nil {
			t.Fatal(err)
		}
	}
	harness.Eventually(t, 15*time.Second, "every role revoked", func() (bool, error) {
		n, err := pg.CountRoles(context.Background(), "esc_")
		return n == 0, err
	})
}

// Caps on live credentials refuse a new volume with ResourceExhausted and
// an event, create nothing past them, and never refuse a republish.
func TestLiveCredentialCaps(t *testing.T) {
	f := startWithEvents(t, "--max-leases-per-namespace", "2", "--max-leases-per-node", "3")
	a1, a2, a3 := pod("team-a", "a1"), pod("team-a", "a2"), pod("team-a", "a3")
	b1, b2 := pod("team-b", "b1"), pod("team-b", "b2")
	f.publish(t, a1)
	f.publish(t, a2)
	f.refused(t, a3, "--max-leases-per-namespace")
	roles(t, 2)
	f.event(t, a3, "live credentials")
	f.publish(t, a1) // a republish at the cap
	f.publish(t, b1)
	f.refused(t, b2, "--max-leases-per-node")
	roles(t, 3)
	f.event(t, b2, "--max-leases-per-node")
	f.refusalsMetric(t, `ephemeral_secrets_publish_refusals_total{limit="namespace_leases",namespace="team-a"} 1`)
	f.refusalsMetric(t, `ephemeral_secrets_publish_refusals_total{limit="node_leases",namespace="team-b"} 1`)

	// A pod that ends frees its slot at once.
	if err := f.kube.Unpublish(context.Background(), a1, "secrets"); err != nil {
		t.Fatal(err)
	}
	f.publish(t, a3)
	f.unpublishAll(t, a2, a3, b1)
}

// The publish rate per namespace refuses a burst past the admin's limit
// with ResourceExhausted and an event, other namespaces and republishes
// unaffected, and nothing is created for the refused.
func TestPublishRatePerNamespace(t *testing.T) {
	f := startWithEvents(t, "--publish-rate-per-namespace", "0.001", "--publish-burst-per-namespace", "2")
	a1, a2, a3 := pod("team-a", "r1"), pod("team-a", "r2"), pod("team-a", "r3")
	b1 := pod("team-b", "r1")
	f.publish(t, a1)
	f.publish(t, a2)
	f.refused(t, a3, "--publish-rate-per-namespace")
	roles(t, 2)
	f.event(t, a3, "per second")
	f.publish(t, a1) // a republish with the bucket empty
	f.publish(t, b1)
	f.refusalsMetric(t, `ephemeral_secrets_publish_refusals_total{limit="publish_rate",namespace="team-a"} 1`)
	f.unpublishAll(t, a1, a2, b1)
}

// A republish is never refused with a final code, even when the token
// rules would refuse it as a first publish (the CSIDriver changed to
// passing tokens in the volume context, say): kubelet would tear down the
// running pod's mount.
func TestRepublishIsNeverRefusedForItsTokens(t *testing.T) {
	ctx := context.Background()
	env := newEnv(t)
	f := start(t, env, class("team-a", "db", "postgres", pgParams(nil)), pgBackend(), "--max-leases-per-namespace", "1",
		"--publish-rate-per-namespace", "0.001", "--publish-burst-per-namespace", "1")
	p := pod("team-a", "steady")
	target, err := f.kube.Publish(ctx, p, volume("db"))
	if err != nil {
		t.Fatal(err)
	}
	for _, inContext := range []bool{true, false} {
		f.kube.TokensInVolumeContext = inContext
		req, err := f.kube.PublishRequest(p, volume("db"))
		if err != nil {
			t.Fatal(err)
		}
		if !inContext { // a pod's own tokens attribute beside kubelet's in secrets
			req.VolumeContext["csi.storage.k8s.io/serviceAccount.tokens"] = `{"vault":{"token":"forged-on-republish"}}`
		}
		_, err = f.kube.Node.NodePublishVolume(ctx, req)
		if c := status.Code(err); c != codes.OK && c != codes.Unavailable {
			t.Fatalf("republish (tokens in context: %v): %v, want OK or Unavailable", inContext, err)
		}
		if len(harness.Mounts(target)) == 0 {
			t.Fatal("the running pod's mount is gone")
		}
	}
	f.kube.TokensInVolumeContext = false
	// At the cap and with the bucket empty, the republish is still fine.
	if _, err := f.kube.Publish(ctx, p, volume("db")); err != nil {
		t.Fatalf("republish at the limits: %v", err)
	}
	if err := f.kube.Unpublish(ctx, p, "secrets"); err != nil {
		t.Fatal(err)
	}
	assertNothingLeft(t, f, p)
}
