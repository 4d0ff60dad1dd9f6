// Package cluster runs the driver binary against a real kube-apiserver
// and etcd: classes come from SecretProviderClass objects through an
// informer, failures become events on the pod, and the driver works with
// nothing but the RBAC of deploy/.
package cluster

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/kube"
	"github.com/ephemeral-secrets/csi-driver/test/pgtest"
)

var (
	cluster   *kube.Cluster
	clients   *kubernetes.Clientset
	pg        *pgtest.Server
	driverBin string
	repoRoot  string
	caFile    string
)

func TestMain(m *testing.M) { os.Exit(run(m)) }

func run(m *testing.M) int {
	fail := func(err error) int { fmt.Println(err); return 1 }
	var err error
	if repoRoot, err = filepath.Abs("../.."); err != nil {
		return fail(err)
	}
	dir, err := os.MkdirTemp("", "esc-cluster-bin-")
	if err != nil {
		return fail(err)
	}
	defer os.RemoveAll(dir)
	// The real command plus the test-only "whoami" provider.
	if driverBin, err = harness.BuildPackage(dir, "./test/cluster/driver"); err != nil {
		return fail(err)
	}
	if pg, err = pgtest.Start(); err != nil {
		return fail(err)
	}
	defer pg.Close()
	if cluster, err = kube.Start(); err != nil {
		return fail(err)
	}
	defer cluster.Stop()
	for _, l := range cluster.LogFiles {
		harness.RegisterLog(l) // the API server's and etcd's logs are searched for tokens too
	}
	if clients, err = kubernetes.NewForConfig(cluster.Config()); err != nil {
		return fail(err)
	}
	caFile = filepath.Join(dir, "ca.crt")
	if err := os.WriteFile(caFile, cluster.CAPEM, 0o600); err != nil {
		return fail(err)
	}
	ctx := context.Background()
	if _, err := clients.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "ephemeral-secrets"}}, metav1.CreateOptions{}); err != nil {
		return fail(err)
	}
	for _, f := range []string{"deploy/kustomize/crds/secretproviderclasses.yaml", "deploy/kustomize/base/rbac.yaml",
		"deploy/kustomize/base/credentials-crd.yaml", "deploy/kustomize/base/inventory.yaml"} {
		data, err := os.ReadFile(filepath.Join(repoRoot, f))
		if err != nil {
			return fail(err)
		}
		data = withoutPolicies(data)
		if err := kube.Apply(ctx, cluster.Config(), data, false); err != nil {
			return fail(fmt.Errorf("%s: %w", f, err))
		}
	}
	defer os.RemoveAll(harness.LogDir())
	code := m.Run()
	return max(code, harness.ReportLogs())
}

// driverKubeconfig writes a kubeconfig that authenticates as the driver's
// own service account, with a token from the TokenRequest API: the driver
// gets exactly the RBAC of deploy/kustomize/base/rbac.yaml.
func driverKubeconfig(t *testing.T, dir string) string {
	t.Helper()
	token := saToken(t, "ephemeral-secrets", "ephemeral-secrets-csi")
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["test"] = &clientcmdapi.Cluster{Server: cluster.URL, CertificateAuthorityData: cluster.CAPEM}
	cfg.AuthInfos["driver"] = &clientcmdapi.AuthInfo{Token: token}
	cfg.Contexts["test"] = &clientcmdapi.Context{Cluster: "test", AuthInfo: "driver"}
	cfg.CurrentContext = "test"
	path := filepath.Join(dir, "kubeconfig")
	if err := clientcmd.WriteToFile(*cfg, path); err != nil {
		t.Fatal(err)
	}
	return path
}

// saToken is a real TokenRequest token for service account sa of ns, for
// the audiences given (the API server's own without any); remembered as a
// secret for the log check.
func saToken(t *testing.T, ns, sa string, audiences ...string) string {
	t.Helper()
	tr, err := clients.CoreV1().ServiceAccounts(ns).CreateToken(context.Background(), sa,
		&authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{Audiences: audiences}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("token for %s/%s: %v", ns, sa, err)
	}
	harness.RememberSecret(tr.Status.Token)
	return tr.Status.Token
}

// namespace creates a namespace with a service account, a pod object (so
// that events have something to point at) and returns the pod's UID.
func namespace(t *testing.T, ns, sa string, pods ...string) map[string]string {
	t.Helper()
	ctx := context.Background()
	if _, err := clients.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := clients.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	uids := map[string]string{}
	for _, name := range pods {
		p, err := clients.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec:       corev1.PodSpec{ServiceAccountName: sa, Containers: []corev1.Container{{Name: "app", Image: "busybox"}}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		uids[name] = string(p.UID)
	}
	return uids
}

// withoutPolicies drops the ValidatingAdmissionPolicies (and bindings)
// from a manifest: they confine a node plugin to the node of its
// pod-bound token, which the driver here (a process, not a pod) has not.
// pkg/inventory tests them.
func withoutPolicies(data []byte) []byte {
	docs := strings.Split(string(data), "\n---\n")
	keep := docs[:0]
	for _, d := range docs {
		if !strings.Contains(d, "\nkind: ValidatingAdmissionPolicy") {
			keep = append(keep, d)
		}
	}
	return []byte(strings.Join(keep, "\n---\n"))
}
