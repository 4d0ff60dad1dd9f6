package alerts

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"k8s.io/client-go/kubernetes"

	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/issuertest"
	"github.com/ephemeral-secrets/csi-driver/test/kube"
	"github.com/ephemeral-secrets/csi-driver/test/pgtest"
)

var (
	cluster          *kube.Cluster
	objs             issuertest.Cluster
	pg               *pgtest.Server
	bin, dir         string
	nodeBin          string // the node plugin's own binary
	issuerKubeconfig string
	driverKubeconfig string
	backends         string
)

func TestMain(m *testing.M) { os.Exit(run(m)) }

func run(m *testing.M) int {
	fail := func(err error) int { fmt.Println(err); return 1 }
	var err error
	if dir, err = os.MkdirTemp("", "esc-alerts-"); err != nil {
		return fail(err)
	}
	defer os.RemoveAll(dir)
	if bin, err = harness.Build(dir); err != nil {
		return fail(err)
	}
	if nodeBin, err = harness.BuildNode(dir); err != nil {
		return fail(err)
	}
	// A second loopback address may log in too: a stolen credential's
	// use from elsewhere (TestForeignUseOnRealMetrics).
	if pg, err = pgtest.StartWith(pgtest.Options{ClientNets: []string{thiefAddr + "/32"}}); err != nil {
		return fail(err)
	}
	defer pg.Close()
	if cluster, err = kube.Start(); err != nil {
		return fail(err)
	}
	defer cluster.Stop()
	for _, l := range cluster.LogFiles {
		harness.RegisterLog(l)
	}
	admin, err := kubernetes.NewForConfig(cluster.Config())
	if err != nil {
		return fail(err)
	}
	objs = issuertest.Cluster{CS: admin}
	if issuerKubeconfig, driverKubeconfig, err = objs.Setup(context.Background(), cluster, dir); err != nil {
		return fail(err)
	}
	backends = filepath.Join(dir, "backends.yaml")
	config := fmt.Sprintf(`postgres:
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
            - namespace: lab
              serviceAccount: agents
`, pg.AdminURL())
	if err := os.WriteFile(backends, []byte(config), 0o600); err != nil {
		return fail(err)
	}
	harness.RememberSecret(pgtest.AdminPassword)
	return max(m.Run(), harness.ReportLogs())
}
