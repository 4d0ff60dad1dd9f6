package alerts

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ephemeral-secrets/csi-driver/test/harness"
)

// thiefAddr is the address a stolen credential is used from: a second
// loopback address, which PostgreSQL lets log in (TestMain) and the
// connection's expectedSources does not list.
const thiefAddr = "127.0.0.2"

// The foreign-use alert on series scraped from the real issuer, sampling
// every 200 ms a real PostgreSQL where a pod's credential is used from
// its expected address (127.0.0.1, the connection's expectedSources),
// then from elsewhere: quiet, then firing with the connection, the role
// and the action.
func TestForeignUseOnRealMetrics(t *testing.T) {
	promtool, err := harness.Tool("promtool")
	if err != nil {
		t.Fatal(err)
	}
	rules, jobs := rendered(t)
	ctx := context.Background()

	// The test's backend file, the connection expecting 127.0.0.1 alone.
	b, err := os.ReadFile(backends)
	if err != nil {
		t.Fatal(err)
	}
	cfg := strings.Replace(string(b), "      maxConns: 4\n", "      maxConns: 4\n      expectedSources: [127.0.0.1/32]\n", 1)
	if cfg == string(b) {
		t.Fatal("the backend file has no line to add expectedSources after")
	}
	path := filepath.Join(t.TempDir(), "backends.yaml")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	is := startIssuerWith(t, "issuer-use", path, "--use-interval=200ms")
	harness.Eventually(t, 60*time.Second, "issuer-use leads", func() (bool, error) { return is.Leading() })
	drv, k := startDriver(t, is)
	driver := Target{URL: "http://" + drv.MetricsAddr + "/metrics", Labels: map[string]string{"job": jobs["node"], "node": node, "instance": drv.MetricsAddr}}
	both := []Target{driver, issuerTarget(is, jobs["issuer"])}

	pod := tenant(t, "orders-used")
	target, err := k.Publish(ctx, pod, volume)
	if err != nil {
		t.Fatal(err)
	}
	// Its sandbox gets an address after its volumes, as a real kubelet
	// reports it: until then the issuer waits before it calls a source
	// foreign (use.PodAddressWait).
	p, err := objs.CS.CoreV1().Pods(pod.Namespace).Get(ctx, pod.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	p.Status.PodIP, p.Status.PodIPs = "10.244.0.9", []corev1.PodIP{{IP: "10.244.0.9"}}
	if _, err := objs.CS.CoreV1().Pods(pod.Namespace).UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	read := func(f string) string {
		b, err := os.ReadFile(filepath.Join(target, f))
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	user, password := read("username"), read("password")
	harness.RememberSecret(password)
	login := func(from string) *pgx.Conn {
		c, err := pgx.ParseConfig(pg.URLFor(user, password, "postgres"))
		if err != nil {
			t.Fatal(err)
		}
		c.DialFunc = (&net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}}).DialContext
		conn, err := pgx.ConnectConfig(ctx, c)
		if err != nil {
			t.Fatalf("login from %s: %v", from, err)
		}
		t.Cleanup(func() { conn.Close(context.Background()) })
		return conn
	}

	// Used from where it is expected, for 12 steps: nothing fires.
	login("127.0.0.1")
	expected := record(both, 12, nil)
	// Then from elsewhere, at the sixth of 16 steps.
	elsewhere := record(both, 16, func(i int) {
		if i == 5 {
			login(thiefAddr)
		}
	})

	cases := []Case{
		{Name: "used where expected", Recording: expected},
		{Name: "used elsewhere", Recording: elsewhere, Firing: map[string][]map[string]string{
			"EphemeralSecretsCredentialUsedElsewhere": {{"connection": "main", "role": "app", "action": "alert"}},
		}},
	}
	out, err := TestRules(promtool, t.TempDir(), rules, cases)
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	t.Logf("promtool:\n%s", out)
}
