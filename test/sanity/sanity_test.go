// Package sanity runs the csi-sanity suite against the driver on a real
// socket, with specs of our own (through sanity.DescribeSanity) that
// publish and unpublish ephemeral volumes the way kubelet does: the stock
// node specs only check arguments, since they take a volume context from
// CreateVolume, which a node-only driver does not have.
package sanity

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/kubernetes-csi/csi-test/v5/pkg/sanity"
	. "github.com/onsi/ginkgo/v2"
	. "github.com/onsi/gomega"
	"k8s.io/klog/v2"

	"github.com/ephemeral-secrets/csi-driver/pkg/issuer"
	pgengine "github.com/ephemeral-secrets/csi-driver/pkg/issuer/postgres"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider/postgres"
	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/pgtest"
)

var (
	env *harness.Env
	pg  *pgtest.Server
)

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	// Driver logs at full verbosity into a file the secret check reads.
	fs := flag.NewFlagSet("klog", flag.ContinueOnError)
	klog.InitFlags(fs)
	logFile := harness.LogPath("sanity-driver")
	_ = fs.Parse([]string{"-v=10", "-logtostderr=false", "-alsologtostderr=false", "-log_file=" + logFile})
	defer os.RemoveAll(harness.LogDir())

	var err error
	if pg, err = pgtest.Start(); err != nil {
		fmt.Println(err)
		return 1
	}
	defer pg.Close()
	if env, err = harness.NewEnv(); err != nil {
		fmt.Println(err)
		return 1
	}
	defer env.Close()
	classes := filepath.Join(env.Base, "classes.yaml")
	if err := os.WriteFile(classes, []byte(classesYAML), 0o600); err != nil {
		fmt.Println(err)
		return 1
	}
	// The postgres provider as the driver serves it: the node side over
	// an in-process issuer.
	iss, err := issuer.New(issuer.Options{Config: pgengine.Config{Connections: map[string]*pgengine.Connection{
		"main": {URL: pg.AdminURL(), Roles: map[string]*pgengine.Role{
			"login": {
				CreationStatements: []string{`CREATE ROLE "{{.Name}}" LOGIN PASSWORD '{{.Password}}' VALID UNTIL '{{.Expiration}}'`},
				Allowed:            []pgengine.Subject{{Namespace: "*", ServiceAccount: "*"}},
			},
		}},
	}}})
	if err != nil {
		fmt.Println(err)
		return 1
	}
	defer iss.Close()
	prov := postgres.NewNode(iss.Local())
	reg := &provider.Registry{}
	_ = reg.Register(postgres.Name, prov)
	drv, err := harness.StartInProcess(env, harness.InProcessOptions{ClassesFile: classes, Providers: reg,
		Audit: auditWriter()})
	if err != nil {
		fmt.Println(err)
		return 1
	}
	code := m.Run()
	drv.Stop()
	klog.Flush()
	return max(code, harness.ReportLogs())
}

var auditMu sync.Mutex

func auditWriter() *os.File {
	auditMu.Lock()
	defer auditMu.Unlock()
	f, err := os.Create(harness.LogPath("sanity-audit"))
	if err != nil {
		panic(err)
	}
	return f
}

const classesYAML = `apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: db
  namespace: sanity
spec:
  provider: postgres
  parameters:
    connection: main
    role: login
`

func TestSanity(t *testing.T) {
	cfg := sanity.NewTestConfig()
	cfg.Address = env.Endpoint()
	cfg.TargetPath = filepath.Join(env.Base, "sanity-target")
	cfg.StagingPath = filepath.Join(env.Base, "sanity-staging")
	cfg.IDGen = &sanity.DefaultIDGenerator{}
	sc := sanity.GinkgoTest(&cfg)
	RegisterFailHandler(Fail)
	suite, reporter := GinkgoConfiguration()
	// A node-only driver: the controller specs, and the one node spec that
	// needs CreateVolume, do not apply.
	suite.SkipStrings = append(suite.SkipStrings, `\[Controller Server\]`, `should remove target path`)
	RunSpecs(t, "ephemeral-secrets-csi sanity", suite, reporter)
	sc.Finalize()
}
