package inventory_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	v1alpha1 "github.com/ephemeral-secrets/csi-driver/pkg/apis/ephemeralsecrets/v1alpha1"
	"github.com/ephemeral-secrets/csi-driver/pkg/credential"
	"github.com/ephemeral-secrets/csi-driver/pkg/inventory"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/kube"
)

// The identities of the tests beside the service accounts of the issuer
// and the node plugin (policy_test.go): a user with the issuer's rights
// but not its identity, and a node-a user with the node plugin's rights,
// both with the rights of the chart's files/inventory-rbac.yaml only.
const (
	issuerUserToken  = "esc-inventory-issuer"
	nodeAToken       = "esc-inventory-node-a"
	controllerToken  = "esc-inventory-kcm"
	housekeeperToken = "esc-inventory-housekeeper"
	uninstallToken   = "esc-inventory-uninstall"
)

var (
	cluster  *kube.Cluster
	admin    *kubernetes.Clientset
	repoRoot string
	// issuerCfg is the issuer's service account (set up with the chart's
	// policies, which every test runs under).
	issuerCfg *rest.Config
	// Inventory clients as the admin, the issuer (its service account),
	// a user with the issuer's rights, and node-a.
	adminInv, issuerInv, issuerUserInv, nodeAInv *inventory.Client
)

func TestMain(m *testing.M) { os.Exit(run(m)) }

func run(m *testing.M) int {
	fail := func(err error) int { fmt.Println(err); return 1 }
	var err error
	if repoRoot, err = filepath.Abs("../.."); err != nil {
		return fail(err)
	}
	cluster, err = kube.StartWith(kube.Options{Users: []kube.User{
		{Token: issuerUserToken, Name: "esc-issuer"},
		{Token: nodeAToken, Name: "esc-node-a"},
		{Token: controllerToken, Name: "system:kube-controller-manager"},
		{Token: housekeeperToken, Name: "esc-housekeeper"},
		{Token: uninstallToken, Name: "esc-uninstall"},
	}})
	if err != nil {
		return fail(err)
	}
	defer cluster.Stop()
	defer stopPostgres()
	for _, l := range cluster.LogFiles {
		harness.RegisterLog(l)
	}
	if admin, err = kubernetes.NewForConfig(cluster.Config()); err != nil {
		return fail(err)
	}
	ctx := context.Background()
	for _, f := range []string{
		"deploy/helm/ephemeral-secrets-csi/files/crds/ephemeral-secrets.csi.dev_credentials.yaml",
		"deploy/helm/ephemeral-secrets-csi/files/inventory-rbac.yaml",
		"pkg/inventory/testdata/bindings.yaml",
	} {
		data, err := os.ReadFile(filepath.Join(repoRoot, f))
		if err != nil {
			return fail(err)
		}
		if err := kube.Apply(ctx, cluster.Config(), data, false); err != nil {
			return fail(fmt.Errorf("%s: %w", f, err))
		}
	}
	for token, c := range map[string]**inventory.Client{kube.AdminToken: &adminInv, issuerUserToken: &issuerUserInv, nodeAToken: &nodeAInv} {
		if *c, err = inventory.NewClient(as(token)); err != nil {
			return fail(err)
		}
	}
	// The CRD is served once a list answers.
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err = adminInv.List(ctx, "", metav1.ListOptions{}); err == nil {
			break
		}
		if time.Now().After(deadline) {
			return fail(fmt.Errorf("the Credential CRD is not served: %w", err))
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err := setUpPolicies(ctx); err != nil {
		return fail(err)
	}
	if issuerInv, err = inventory.NewClient(issuerCfg); err != nil {
		return fail(err)
	}
	for _, token := range []string{issuerUserToken, nodeAToken, controllerToken, housekeeperToken, uninstallToken} {
		harness.RememberSecret(token)
	}
	return max(m.Run(), harness.ReportLogs())
}

// as is a client configuration with a bearer token.
func as(token string) *rest.Config {
	cfg := cluster.Config()
	cfg.BearerToken = token
	return cfg
}

// namespace makes a namespace of its own for a test.
func namespace(t testing.TB) string {
	t.Helper()
	ns, err := admin.CoreV1().Namespaces().Create(context.Background(),
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{GenerateName: "inv-"}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return ns.Name
}

// newPod creates a pod (never scheduled: no kubelet here) and returns it.
func newPod(t testing.TB, ns, name string) *corev1.Pod {
	t.Helper()
	pod, err := admin.CoreV1().Pods(ns).Create(context.Background(), &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: corev1.PodSpec{
			ServiceAccountName: "default",
			Containers:         []corev1.Container{{Name: "app", Image: "registry.k8s.io/pause:3.10"}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return pod
}

// entryFor is the entry of a credential of pod on node.
func entryFor(pod *corev1.Pod, node, leaseID string) credential.Record {
	return credential.Record{
		LeaseID: leaseID, VolumeID: "csi-" + leaseID, Node: node,
		Pod:   provider.Pod{Namespace: pod.Namespace, Name: pod.Name, UID: string(pod.UID), ServiceAccount: "default"},
		Class: pod.Namespace + "/orders-db", Provider: "postgres", Role: "main/orders", Name: "v-" + leaseID,
		IssuedAt: time.Now().Truncate(time.Second), ExpiresAt: time.Now().Add(time.Hour).Truncate(time.Second),
	}
}

// record makes e's record as the issuer does: Issuing, then Issued.
func record(t *testing.T, rec *inventory.Recorder, e credential.Record) {
	t.Helper()
	ctx := context.Background()
	if err := rec.Issuing(ctx, e); err != nil {
		t.Fatal(err)
	}
	if err := rec.Issued(ctx, e); err != nil {
		t.Fatal(err)
	}
}

// revoker counts the revocations a Controller asks for, and fails the
// first `failures` of them.
type revoker struct {
	mu       sync.Mutex
	calls    []credential.Record
	at       []time.Time
	failures atomic.Int32
	then     func(context.Context, credential.Record) error // after a success (the issuer's Drop calls Dropped)
}

func (r *revoker) revoke(ctx context.Context, e credential.Record) error {
	r.mu.Lock()
	r.calls = append(r.calls, e)
	r.at = append(r.at, time.Now())
	n, then := len(r.calls), r.then
	r.mu.Unlock()
	if r.failures.Add(-1) >= 0 { // a message of its own each time, as a backend's may be
		return fmt.Errorf("backend unavailable (attempt %d): %w", n, provider.ErrUnavailable)
	}
	if then != nil {
		return then(ctx, e)
	}
	return nil
}

// setThen sets what follows a successful revocation; the controller may
// be revoking already (the records other tests left).
func (r *revoker) setThen(f func(context.Context, credential.Record) error) {
	r.mu.Lock()
	r.then = f
	r.mu.Unlock()
}

func (r *revoker) times() []time.Time {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.at)
}

func (r *revoker) entries() []credential.Record {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.calls)
}

func (r *revoker) leases() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for _, e := range r.calls {
		out = append(out, e.LeaseID)
	}
	return out
}

// startIssuer runs the issuer's side as the issuer identity: an informer
// shared by a Recorder and a Controller that revokes through rv.
func startIssuer(t *testing.T, rv *revoker, opts inventory.ControllerOptions) *inventory.Recorder {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	inf := inventory.NewInformer(issuerInv, "", 0)
	pods, err := kubernetes.NewForConfig(issuerCfg)
	if err != nil {
		t.Fatal(err)
	}
	ctl := inventory.NewController(issuerInv, inf, pods.CoreV1(), rv.revoke, opts)
	done := make(chan struct{}, 2)
	go func() { inf.Run(ctx.Done()); done <- struct{}{} }()
	go func() {
		if err := ctl.Run(ctx, 2); err != nil && ctx.Err() == nil {
			t.Error(err)
		}
		done <- struct{}{}
	}()
	t.Cleanup(func() { cancel(); <-done; <-done })
	harness.Eventually(t, 10*time.Second, "the issuer's cache synced", func() (bool, error) { return inf.HasSynced(), nil })
	return inventory.NewRecorder(issuerInv, inf)
}

// gone waits until a record no longer exists.
func gone(t *testing.T, ns, name string) {
	t.Helper()
	harness.Eventually(t, 30*time.Second, "record "+ns+"/"+name+" gone", func() (bool, error) {
		_, err := adminInv.Get(context.Background(), ns, name)
		if apierrors.IsNotFound(err) {
			return true, nil
		}
		return false, err
	})
}

// get reads a record as the admin.
func get(t *testing.T, ns, leaseID string) *v1alpha1.Credential {
	t.Helper()
	c, err := adminInv.Get(context.Background(), ns, inventory.Name(leaseID))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// startGC runs kube-controller-manager's garbage collector (and nothing
// else of it) until the test ends.
func startGC(t *testing.T) {
	t.Helper()
	bin, err := kube.Tool("kube-controller-manager")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	kcfg, ca := filepath.Join(dir, "kcm.kubeconfig"), filepath.Join(dir, "ca.crt")
	if err := cluster.Kubeconfig(kcfg, "", controllerToken); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(ca, cluster.CAPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	ports, err := harness.FreePorts(1)
	if err != nil {
		t.Fatal(err)
	}
	logPath := harness.LogPath("kube-controller-manager")
	log, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer log.Close()
	cmd := exec.Command(bin, "--kubeconfig", kcfg, "--authentication-kubeconfig", kcfg, "--authorization-kubeconfig", kcfg,
		"--leader-elect=false", "--use-service-account-credentials=true",
		"--service-account-private-key-file", cluster.SAKeyFile(), "--root-ca-file", ca,
		"--bind-address", "127.0.0.1", fmt.Sprintf("--secure-port=%d", ports[0]),
		"--controllers", "garbagecollector", "--v", "2")
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		_ = cmd.Wait()
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			if len(b) > 4000 {
				b = b[len(b)-4000:]
			}
			t.Logf("kube-controller-manager log:\n%s", b)
		}
	})
}
