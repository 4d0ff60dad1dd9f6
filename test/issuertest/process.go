package issuertest

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/ephemeral-secrets/csi-driver/test/freeport"
	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/kube"
)

// IssuerNamespace is where the test issuers run, beside the driver.
const IssuerNamespace = DriverNamespace

// RBAC is what the issuer and the node plugin need of the API, and
// nothing more: the tests run them with exactly this.
const RBAC = `
apiVersion: v1
kind: ServiceAccount
metadata: {name: ephemeral-secrets-csi-issuer, namespace: esc-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: ephemeral-secrets-csi-issuer}
rules:
- {apiGroups: [""], resources: [pods], verbs: [get, list, watch]}
- {apiGroups: [""], resources: [nodes], verbs: [get]}
- {apiGroups: [""], resources: [events], verbs: [create]}
- {apiGroups: [authentication.k8s.io], resources: [tokenreviews], verbs: [create]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: ephemeral-secrets-csi-issuer}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: ephemeral-secrets-csi-issuer}
subjects: [{kind: ServiceAccount, name: ephemeral-secrets-csi-issuer, namespace: esc-system}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: ephemeral-secrets-csi-issuer, namespace: esc-system}
rules:
- {apiGroups: [""], resources: [secrets, configmaps], verbs: [create]}
- {apiGroups: [""], resources: [secrets], resourceNames: [ephemeral-secrets-csi-issuer-tls], verbs: [get, update]}
- {apiGroups: [""], resources: [configmaps], resourceNames: [ephemeral-secrets-csi-issuer-ca], verbs: [get, update]}
- {apiGroups: [coordination.k8s.io], resources: [leases], verbs: [create]}
- {apiGroups: [coordination.k8s.io], resources: [leases], resourceNames: [ephemeral-secrets-csi-issuer], verbs: [get, update]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: ephemeral-secrets-csi-issuer, namespace: esc-system}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: ephemeral-secrets-csi-issuer}
subjects: [{kind: ServiceAccount, name: ephemeral-secrets-csi-issuer, namespace: esc-system}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: ephemeral-secrets-csi-issuer-ca, namespace: esc-system}
rules:
- {apiGroups: [""], resources: [configmaps], resourceNames: [ephemeral-secrets-csi-issuer-ca], verbs: [get]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: ephemeral-secrets-csi-issuer-ca, namespace: esc-system}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: ephemeral-secrets-csi-issuer-ca}
subjects: [{kind: ServiceAccount, name: ephemeral-secrets-csi, namespace: esc-system}]
`

// inventoryBinding gives the issuer the inventory's rights (the chart's
// files/inventory-rbac.yaml).
const inventoryBinding = `
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: ephemeral-secrets-csi-issuer-inventory}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: ephemeral-secrets-csi-issuer-inventory}
subjects: [{kind: ServiceAccount, name: ephemeral-secrets-csi-issuer, namespace: esc-system}]
`

// Setup applies RBAC, the Credential CRD and the inventory's rights (with the namespace and the driver's account) and
// writes, in dir, a kubeconfig of the issuer's service account and one
// of the driver's, and returns their paths.
func (c Cluster) Setup(ctx context.Context, k *kube.Cluster, dir string) (issuerKubeconfig, driverKubeconfig string, err error) {
	if err := c.Namespace(ctx, DriverNamespace, DriverServiceAccount); err != nil {
		return "", "", err
	}
	// The inventory the issuer keeps: the chart's CRD and rights.
	_, self, _, _ := runtime.Caller(0)
	chart := filepath.Join(filepath.Dir(self), "..", "..", "deploy", "helm", "ephemeral-secrets-csi")
	docs := []byte(RBAC + inventoryBinding)
	for _, f := range []string{"files/crds/ephemeral-secrets.csi.dev_credentials.yaml", "files/inventory-rbac.yaml"} {
		data, err := os.ReadFile(filepath.Join(chart, f))
		if err != nil {
			return "", "", err
		}
		docs = append(append(docs, "\n---\n"...), data...)
	}
	if err := kube.Apply(ctx, k.Config(), docs, false); err != nil {
		return "", "", err
	}
	for _, sa := range []struct{ name, path string }{
		{"ephemeral-secrets-csi-issuer", filepath.Join(dir, "issuer.kubeconfig")},
		{DriverServiceAccount, filepath.Join(dir, "driver.kubeconfig")},
	} {
		tok, err := c.UnboundToken(ctx, DriverNamespace, sa.name, k.Issuer)
		if err != nil {
			return "", "", err
		}
		if err := k.Kubeconfig(sa.path, "", tok); err != nil {
			return "", "", err
		}
	}
	return filepath.Join(dir, "issuer.kubeconfig"), filepath.Join(dir, "driver.kubeconfig"), nil
}

// Issuer is one running "ephemeral-secrets-csi issuer".
type Issuer struct {
	ID      string
	Addr    string // host:port of its HTTPS listener
	Metrics string // host:port of /metrics, /healthz, /readyz
	LogFile string
	cmd     *exec.Cmd
	done    chan struct{}
}

// StartIssuer starts the binary's issuer as replica id, listening on
// addr (a free port if empty: a restarted replica keeps its address, as
// behind a Service), with the backend file and kubeconfig given, and
// more flags.
func StartIssuer(bin, id, addr, kubeconfig, backends string, flags ...string) (*Issuer, error) {
	ports, err := freeport.Ports(2)
	if err != nil {
		return nil, err
	}
	if addr == "" {
		addr = fmt.Sprintf("127.0.0.1:%d", ports[0])
	}
	is := &Issuer{ID: id, Addr: addr, Metrics: fmt.Sprintf("127.0.0.1:%d", ports[1]), LogFile: harness.LogPath("issuer-" + id), done: make(chan struct{})}
	log, err := os.Create(is.LogFile)
	if err != nil {
		return nil, err
	}
	harness.RegisterLog(is.LogFile)
	args := append([]string{"issuer", "--kubeconfig", kubeconfig, "--namespace", IssuerNamespace, "--backend-config", backends,
		"--listen-address", is.Addr, "--metrics-address", is.Metrics,
		"--leader-election-identity", id, "--tls-dns-names", "localhost", "--audit-log", "-", "-v", "2"}, flags...)
	is.cmd = exec.Command(bin, args...)
	is.cmd.Stdout, is.cmd.Stderr = log, log
	is.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := is.cmd.Start(); err != nil {
		return nil, err
	}
	go func() { _ = is.cmd.Wait(); log.Close(); close(is.done) }()
	return is, nil
}

// URL is the address node plugins dial (the certificate names localhost).
func (is *Issuer) URL() string {
	_, port, _ := net.SplitHostPort(is.Addr)
	return "https://localhost:" + port
}

// Pid is the process's ID.
func (is *Issuer) Pid() int { return is.cmd.Process.Pid }

// Kill ends the process at once (a node lost, an OOM kill).
func (is *Issuer) Kill() { _ = is.cmd.Process.Kill(); <-is.done }

// Stop ends the process as kubelet does (SIGTERM) and waits.
func (is *Issuer) Stop() {
	_ = is.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-is.done:
	case <-time.After(30 * time.Second):
		is.Kill()
	}
}

// Exited tells whether the process is gone.
func (is *Issuer) Exited() bool {
	select {
	case <-is.done:
		return true
	default:
		return false
	}
}

// Leading tells whether the replica's metrics say it leads.
func (is *Issuer) Leading() (bool, error) {
	resp, err := http.Get("http://" + is.Metrics + "/metrics")
	if err != nil {
		return false, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return false, err
	}
	for line := range strings.SplitSeq(string(body), "\n") {
		if v, ok := strings.CutPrefix(line, "ephemeral_secrets_issuer_leader "); ok {
			return strings.TrimSpace(v) == "1", nil
		}
	}
	return false, fmt.Errorf("%s: no leader metric", is.ID)
}

// Leader is the holder of the issuers' Lease ("" without one).
func Leader(ctx context.Context, cs kubernetes.Interface) (string, error) {
	l, err := cs.CoordinationV1().Leases(IssuerNamespace).Get(ctx, "ephemeral-secrets-csi-issuer", metav1.GetOptions{})
	if err != nil {
		return "", err
	}
	if l.Spec.HolderIdentity == nil {
		return "", nil
	}
	return *l.Spec.HolderIdentity, nil
}
