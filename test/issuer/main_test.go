// Package issuer runs the cluster issuer ("ephemeral-secrets-csi issuer",
// two replicas, with exactly the RBAC of issuertest.RBAC) against a real
// kube-apiserver and PostgreSQL, and node plugins' side of it (the
// postgres provider over the HTTPS client) with bound tokens of the
// driver's pods on their nodes.
package issuer

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/issuertest"
	"github.com/ephemeral-secrets/csi-driver/test/kube"
	"github.com/ephemeral-secrets/csi-driver/test/pgtest"
)

var (
	cluster          *kube.Cluster
	admin            *kubernetes.Clientset
	objs             issuertest.Cluster
	pg               *pgtest.Server
	bin, dir         string
	nodeBin          string // the node plugin's own binary
	issuerKubeconfig string
	driverKubeconfig string
	driverClients    *kubernetes.Clientset // the node plugin's own RBAC
	backends         string
)

func TestMain(m *testing.M) { os.Exit(run(m)) }

func run(m *testing.M) int {
	fail := func(err error) int { fmt.Println(err); return 1 }
	var err error
	if dir, err = os.MkdirTemp("", "esc-issuer-"); err != nil {
		return fail(err)
	}
	defer os.RemoveAll(dir)
	if bin, err = harness.Build(dir); err != nil {
		return fail(err)
	}
	if nodeBin, err = harness.BuildNode(dir); err != nil {
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
	if admin, err = kubernetes.NewForConfig(cluster.Config()); err != nil {
		return fail(err)
	}
	objs = issuertest.Cluster{CS: admin}
	ctx := context.Background()
	if issuerKubeconfig, driverKubeconfig, err = objs.Setup(ctx, cluster, dir); err != nil {
		return fail(err)
	}
	rc, err := clientcmd.BuildConfigFromFlags("", driverKubeconfig)
	if err != nil {
		return fail(err)
	}
	if driverClients, err = kubernetes.NewForConfig(rc); err != nil {
		return fail(err)
	}
	backends = filepath.Join(dir, "backends.yaml")
	if err := os.WriteFile(backends, []byte(BackendConfig(pg.AdminURL())), 0o600); err != nil {
		return fail(err)
	}
	harness.RememberSecret(pgtest.AdminPassword)
	code := m.Run()
	stopIssuers()
	if code == 0 {
		code = harness.ReportLogs()
	}
	return code
}

// BackendConfig is the issuer's postgres configuration: role app of
// connection main, for service account orders of namespace shop.
func BackendConfig(adminURL string) string {
	return fmt.Sprintf(`postgres:
  connections:
    main:
      url: %s
      maxConns: 4
      roles:
        app:
          defaultTTL: 1h
          maxTTL: 2h
          creationStatements:
            - CREATE ROLE "{{.Name}}" LOGIN PASSWORD '{{.Password}}' VALID UNTIL '{{.Expiration}}'
          allowed:
            - namespace: shop
              serviceAccount: orders
`, adminURL)
}
