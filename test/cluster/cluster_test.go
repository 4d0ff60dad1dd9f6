package cluster

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/dynamic"

	"github.com/ephemeral-secrets/csi-driver/pkg/spc"
	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/kubelet"
)

const backendsYAML = `postgres:
  connections:
    main:
      url: %s
      roles:
        reader:
          creationStatements:
            - CREATE ROLE "{{.Name}}" LOGIN PASSWORD '{{.Password}}' VALID UNTIL '{{.Expiration}}'
          allowed:
            - namespace: team-a
              serviceAccount: app
`

type fixture struct {
	env    *harness.Env
	driver *harness.Driver
	kube   *kubelet.Kubelet
}

func setup(t *testing.T) *fixture {
	t.Helper()
	return setupWith(t, fmt.Sprintf(backendsYAML, pg.AdminURL()))
}

// setupWith starts the driver, reading classes from the cluster, with this
// backend configuration.
func setupWith(t *testing.T, backendsConfig string) *fixture {
	t.Helper()
	env, err := harness.NewEnv()
	if err != nil {
		t.Fatal(err)
	}
	backends := filepath.Join(env.Base, "backends.yaml")
	if err := os.WriteFile(backends, []byte(backendsConfig), 0o600); err != nil {
		t.Fatal(err)
	}
	f := &fixture{env: env}
	f.driver = &harness.Driver{Bin: driverBin, Env: env, Environ: []string{
		"WHOAMI_API_SERVER=" + cluster.URL, "WHOAMI_CA_FILE=" + caFile,
	}, Args: []string{
		"--kubeconfig", driverKubeconfig(t, env.Base), "--backend-config", backends,
		"--audit-log", harness.LogPath("cluster-audit"),
		// Not the harness's -v=10: from -v=6 client-go traces its requests
		// (debuggingRoundTripper), and that tracer races with itself under
		// -race (client-go v0.35.4, transport/round_trippers.go:558/621).
		"-v", "5",
	}}
	if err := f.driver.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	if f.kube, err = kubelet.Dial(env.Endpoint(), env.KubeletDir); err != nil {
		t.Fatal(err)
	}
	f.kube.TokensInSecrets = true // as deploy/ sets serviceAccountTokenInSecrets
	t.Cleanup(func() {
		f.kube.Close()
		f.driver.Stop()
		if t.Failed() {
			t.Logf("driver log (tail):\n%s", f.driver.LogTail(4000))
		}
		_ = env.Close()
	})
	return f
}

func createClass(t *testing.T, ns, name string, params map[string]any) {
	t.Helper()
	createClassOf(t, ns, name, "postgres", params)
}

func createClassOf(t *testing.T, ns, name, prov string, params map[string]any) {
	t.Helper()
	createClassSpec(t, ns, name, map[string]any{"provider": prov, "parameters": params})
}

func createClassSpec(t *testing.T, ns, name string, spec map[string]any) {
	t.Helper()
	dyn, err := dynamic.NewForConfig(cluster.Config())
	if err != nil {
		t.Fatal(err)
	}
	obj := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "secrets-store.csi.x-k8s.io/v1", "kind": "SecretProviderClass",
		"metadata": map[string]any{"name": name, "namespace": ns},
		"spec":     spec,
	}}
	if _, err := dyn.Resource(spc.GVR).Namespace(ns).Create(context.Background(), obj, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

func updateClass(t *testing.T, ns, name string, params map[string]any) {
	t.Helper()
	dyn, err := dynamic.NewForConfig(cluster.Config())
	if err != nil {
		t.Fatal(err)
	}
	ri := dyn.Resource(spc.GVR).Namespace(ns)
	obj, err := ri.Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := unstructured.SetNestedField(obj.Object, params, "spec", "parameters"); err != nil {
		t.Fatal(err)
	}
	if _, err := ri.Update(context.Background(), obj, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// podFor is a kubelet pod with the API object's UID and a real
// TokenRequest token for its service account (audience "vault").
func podFor(t *testing.T, ns, name, sa, uid string) kubelet.Pod {
	t.Helper()
	tr := saToken(t, ns, sa, "vault")
	return kubelet.Pod{Namespace: ns, Name: name, UID: uid, ServiceAccount: sa, Tokens: map[string]string{"vault": tr}}
}

func volume(class string) kubelet.Volume {
	return kubelet.Volume{Name: "db", ReadOnly: true, Attributes: map[string]string{"secretProviderClass": class}}
}

// apiRequests sums the driver's Kubernetes API request counter.
func apiRequests(t *testing.T, d *harness.Driver) int {
	t.Helper()
	_, body, err := d.Scrape("/metrics")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, line := range strings.Split(body, "\n") {
		if strings.HasPrefix(line, "ephemeral_secrets_kubernetes_api_requests_total{") {
			v, err := strconv.ParseFloat(line[strings.LastIndex(line, " ")+1:], 64)
			if err != nil {
				t.Fatal(err)
			}
			n += int(v)
		}
	}
	return n
}

func TestClassesComeFromThePodsNamespaceThroughTheCache(t *testing.T) {
	ctx := context.Background()
	uidsA := namespace(t, "team-a", "app", "agent", "agent-2", "nosy")
	uidsB := namespace(t, "team-b", "app", "intruder")
	createClass(t, "team-a", "db", map[string]any{"connection": "main", "role": "reader"})
	f := setup(t)

	// A pod in team-a gets its class; the publish asks the API nothing.
	pod := podFor(t, "team-a", "agent", "app", uidsA["agent"])
	before := apiRequests(t, f.driver)
	target, err := f.kube.Publish(ctx, pod, volume("db"))
	if err != nil {
		t.Fatalf("publish in team-a: %v", err)
	}
	pw, err := os.ReadFile(filepath.Join(target, "password"))
	if err != nil {
		t.Fatal(err)
	}
	harness.RememberSecret(string(pw))
	if _, err := f.kube.Publish(ctx, pod, volume("db")); err != nil {
		t.Fatalf("republish: %v", err)
	}
	if err := f.kube.Unpublish(ctx, pod, "db"); err != nil {
		t.Fatal(err)
	}
	if after := apiRequests(t, f.driver); after != before {
		t.Errorf("publish, republish and unpublish made %d Kubernetes API requests, want 0", after-before)
	}

	// The same class name from team-b is not found: classes do not cross namespaces.
	intruder := podFor(t, "team-b", "intruder", "app", uidsB["intruder"])
	_, err = f.kube.Publish(ctx, intruder, volume("db"))
	if status.Code(err) != codes.NotFound {
		t.Fatalf("team-b using team-a's class: %v, want NotFound", err)
	}
	// ...and the pod is told why.
	if msg := warningEvent(t, "team-b", "intruder", "SecretProviderClassNotFound"); !strings.Contains(msg, "db") {
		t.Errorf("event message does not name the class: %q", msg)
	}

	// A refused service account: PermissionDenied, and an event that carries no token.
	createClass(t, "team-b", "db", map[string]any{"connection": "main", "role": "reader"})
	harness.Eventually(t, 10*time.Second, "team-b's own class seen", func() (bool, error) {
		_, err := f.kube.Publish(ctx, intruder, volume("db"))
		return status.Code(err) == codes.PermissionDenied, nil
	})
	harness.Eventually(t, 10*time.Second, "permission event", func() (bool, error) {
		evs, err := clients.CoreV1().Events("team-b").List(ctx, metav1.ListOptions{})
		if err != nil {
			return false, err
		}
		for _, e := range evs.Items {
			if e.Reason == "CredentialNotAllowed" {
				if strings.Contains(e.Message, intruder.Tokens["vault"]) {
					t.Errorf("event carries the pod's token")
				}
				return true, nil
			}
		}
		return false, nil
	})

	// An edit of the class is seen without a restart.
	updateClass(t, "team-a", "db", map[string]any{"connection": "main", "role": "reader",
		"files": "- {path: dsn, template: 'postgres://{{ .username }}@{{ .host }}:{{ .port }}/{{ .database }}'}\n- {path: password, value: password}"})
	pod2 := podFor(t, "team-a", "agent-2", "app", uidsA["agent-2"])
	harness.Eventually(t, 10*time.Second, "updated class used", func() (bool, error) {
		target, err := f.kube.Publish(ctx, pod2, volume("db"))
		if err != nil {
			return false, err
		}
		pw, _ := os.ReadFile(filepath.Join(target, "password"))
		harness.RememberSecret(string(pw))
		if _, err := os.Stat(filepath.Join(target, "dsn")); err != nil {
			// Published with the old layout: unpublish and try again.
			return false, f.kube.Unpublish(ctx, pod2, "db")
		}
		return true, nil
	})
	if err := f.kube.Unpublish(ctx, pod2, "db"); err != nil {
		t.Fatal(err)
	}

	// A class that asks for a sync to a Kubernetes Secret (kept by the
	// CRD, not pruned) is refused, and the pod is told why.
	createClassSpec(t, "team-a", "synced", map[string]any{
		"provider": "postgres", "parameters": map[string]any{"connection": "main", "role": "reader"},
		"secretObjects": []any{map[string]any{"secretName": "db", "type": "Opaque",
			"data": []any{map[string]any{"objectName": "password", "key": "password"}}}},
	})
	nosy := podFor(t, "team-a", "nosy", "app", uidsA["nosy"])
	harness.Eventually(t, 10*time.Second, "class with secretObjects refused", func() (bool, error) {
		_, err := f.kube.Publish(ctx, nosy, volume("synced"))
		if err == nil {
			t.Fatal("a class with secretObjects was accepted")
		}
		return status.Code(err) == codes.InvalidArgument, nil
	})
	if msg := warningEvent(t, "team-a", "nosy", "InvalidVolumeRequest"); !strings.Contains(msg, "never writes Kubernetes Secrets") {
		t.Errorf("event does not say why: %q", msg)
	}
}

// warningEvent waits for a Warning event of reason on the pod and returns
// its message.
func warningEvent(t *testing.T, ns, pod, reason string) string {
	t.Helper()
	var msg string
	harness.Eventually(t, 10*time.Second, reason+" event on "+ns+"/"+pod, func() (bool, error) {
		evs, err := clients.CoreV1().Events(ns).List(context.Background(), metav1.ListOptions{})
		if err != nil {
			return false, err
		}
		for _, e := range evs.Items {
			if e.InvolvedObject.Name == pod && e.Type == "Warning" && e.Reason == reason {
				msg = e.Message
				return true, nil
			}
		}
		return false, nil
	})
	return msg
}

// A real TokenRequest token for the pod's service account reaches the
// provider: the test-only whoami provider shows it to the API server,
// which names the pod's service account. A token for another audience is
// refused by the server.
func TestThePodsOwnTokenReachesTheProvider(t *testing.T) {
	ctx := context.Background()
	uids := namespace(t, "team-c", "agent", "bot", "bot-2")
	createClassOf(t, "team-c", "who", "whoami", map[string]any{})
	f := setup(t)
	pod := podFor(t, "team-c", "bot", "agent", uids["bot"])
	target, err := f.kube.Publish(ctx, pod, volume("who"))
	if err != nil {
		t.Fatalf("publish: %v", err)
	}
	got, err := os.ReadFile(filepath.Join(target, "identity"))
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != "system:serviceaccount:team-c:agent" {
		t.Errorf("the provider saw %q, want the pod's service account", got)
	}
	if err := f.kube.Unpublish(ctx, pod, "db"); err != nil {
		t.Fatal(err)
	}
	// A token minted for another audience does not pass.
	tr := saToken(t, "team-c", "agent", "some-other-service")
	wrong := kubelet.Pod{Namespace: "team-c", Name: "bot-2", UID: uids["bot-2"], ServiceAccount: "agent",
		Tokens: map[string]string{"vault": tr}}
	if _, err := f.kube.Publish(ctx, wrong, volume("who")); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("token of another audience: %v, want PermissionDenied", err)
	}
}
