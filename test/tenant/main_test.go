// Package tenant is the driver seen by a hostile tenant: someone who may
// write SecretProviderClasses and pods in one namespace, and nothing else.
// It runs the real driver binary against real tmpfs, PostgreSQL, Vault and
// kube-apiserver, with root-only files planted on the "node" and watched
// for opens, and local listeners standing in for Vault and STS that record
// every connection, and checks that each hostile class or pod gets the
// right CSI code and nothing more: no file read outside the admin's trust
// material, no address dialled off the admin's lists or without
// verification, bounded memory and CPU, and nothing left behind.
package tenant

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/lease"
	"github.com/ephemeral-secrets/csi-driver/pkg/storage"
	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/kubelet"
	"github.com/ephemeral-secrets/csi-driver/test/pgtest"
	"github.com/ephemeral-secrets/csi-driver/test/standin"
)

var (
	driverBin string
	pg        *pgtest.Server
)

func TestMain(m *testing.M) { os.Exit(run(m)) }

func run(m *testing.M) int {
	if os.Geteuid() != 0 {
		fmt.Println("tenant tests mount tmpfs, plant root-only files and need root")
		return 1
	}
	dir, err := os.MkdirTemp("", "esc-tenant-bin-")
	if err != nil {
		fmt.Println(err)
		return 1
	}
	defer os.RemoveAll(dir)
	if driverBin, err = harness.Build(dir); err != nil {
		fmt.Println(err)
		return 1
	}
	if pg, err = pgtest.Start(); err != nil {
		fmt.Println(err)
		return 1
	}
	defer pg.Close()
	harness.RegisterLog(pg.LogFile)
	defer stopServers()
	if err := pg.Exec(context.Background(), `CREATE TABLE public.items (id int PRIMARY KEY, name text)`); err != nil {
		fmt.Println(err)
		return 1
	}
	defer os.RemoveAll(harness.LogDir())
	code := m.Run()
	return max(code, harness.ReportLogs())
}

// pgBackend is the postgres section of the admin's configuration: role
// "reader" for team-a's service account "app".
func pgBackend() string {
	return fmt.Sprintf(`postgres:
  connections:
    main:
      url: %s
      roles:
        reader:
          defaultTTL: 1h
          maxTTL: 2h
          creationStatements:
            - CREATE ROLE "{{.Name}}" LOGIN PASSWORD '{{.Password}}' VALID UNTIL '{{.Expiration}}'
            - GRANT SELECT ON public.items TO "{{.Name}}"
          allowed:
            - namespace: team-a
              serviceAccount: app
            - namespace: team-b
              serviceAccount: app
`, pg.AdminURL())
}

// fixture is one driver with its environment and kubelet.
type fixture struct {
	env    *harness.Env
	driver *harness.Driver
	kube   *kubelet.Kubelet
	audit  string // the driver's audit log
}

// start runs the driver binary with the classes and backend configuration
// given, and extra flags.
func start(t *testing.T, env *harness.Env, classes, backends string, extra ...string) *fixture {
	t.Helper()
	f := &fixture{env: env, audit: harness.LogPath("audit")}
	write := func(name, content string) string {
		p := filepath.Join(env.Base, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	args := append([]string{
		"--classes-file", write("classes.yaml", classes),
		"--backend-config", write("backends.yaml", backends),
		"--audit-log", f.audit,
		"--retry-min", "200ms", "--retry-max", "1s", "--backend-timeout", "5s",
	}, extra...)
	f.driver = &harness.Driver{Bin: driverBin, Env: env, Args: args}
	if err := f.driver.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	var err error
	if f.kube, err = kubelet.Dial(env.Endpoint(), env.KubeletDir); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		f.kube.Close()
		f.driver.Stop()
		if t.Failed() {
			t.Logf("driver log (tail):\n%s", f.driver.LogTail(6000))
		}
	})
	return f
}

func newEnv(t *testing.T) *harness.Env {
	t.Helper()
	env, err := harness.NewEnv()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = env.Close() })
	return env
}

// class is one SecretProviderClass document.
func class(ns, name, provider string, params map[string]string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "apiVersion: secrets-store.csi.x-k8s.io/v1\nkind: SecretProviderClass\nmetadata:\n  name: %s\n  namespace: %s\nspec:\n  provider: %s\n  parameters:\n", name, ns, provider)
	for k, v := range params {
		fmt.Fprintf(&b, "    %s: %q\n", k, v)
	}
	return b.String()
}

// pod is a pod of ns with service account "app" and kubelet's tokens for
// both audiences, remembered as secrets for the log check.
func pod(ns, name string) kubelet.Pod {
	p := kubelet.NewPod(ns, name, "app")
	p.Tokens = map[string]string{"vault": standin.Token(ns, "app", p.UID, "vault"), "sts.amazonaws.com": standin.Token(ns, "app", p.UID, "sts.amazonaws.com")}
	for _, tok := range p.Tokens {
		harness.RememberSecret(tok)
	}
	return p
}

func volume(class string) kubelet.Volume {
	return kubelet.Volume{Name: "secrets", Attributes: map[string]string{"secretProviderClass": class}, MountGroup: "1234", ReadOnly: true}
}

// assertNothingLeft checks that a refused publish left no mount, no
// volume state, no live or queued lease and no PostgreSQL role.
func assertNothingLeft(t *testing.T, f *fixture, p kubelet.Pod) {
	t.Helper()
	if m := harness.Mounts(filepath.Join(f.env.KubeletDir, "pods", p.UID)); len(m) != 0 {
		t.Errorf("mounts left: %v", m)
	}
	if m := harness.Mounts(filepath.Join(f.env.StateDir, "volumes")); len(m) != 0 {
		t.Errorf("volume tmpfs left: %v", m)
	}
	if _, err := os.Stat(f.kube.TargetPath(p, "secrets")); err == nil {
		t.Errorf("target directory left")
	}
	ctx := context.Background()
	harness.Eventually(t, 15*time.Second, "no role and no live or queued lease left", func() (bool, error) {
		if entries, _ := os.ReadDir(filepath.Join(f.env.StateDir, "volumes")); len(entries) != 0 {
			return false, fmt.Errorf("%d volume directories left", len(entries))
		}
		n, err := pg.CountRoles(ctx, "esc_")
		if err != nil || n != 0 {
			return false, fmt.Errorf("%d roles left (%v)", n, err)
		}
		store, err := storage.OpenExisting(f.env.StateDir)
		if err != nil {
			return false, err
		}
		inv, err := lease.ReadInventory(lease.NewStateRecords(store))
		if err != nil {
			return false, err
		}
		if len(inv.Live)+len(inv.Pending) != 0 {
			return false, fmt.Errorf("%d live and %d queued leases", len(inv.Live), len(inv.Pending))
		}
		return true, nil
	})
}
