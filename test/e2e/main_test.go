// Package e2e runs the real driver binary against a real PostgreSQL, with
// real tmpfs and bind mounts, playing kubelet over the CSI socket.
package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ephemeral-secrets/csi-driver/pkg/storage"
	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/kubelet"
	"github.com/ephemeral-secrets/csi-driver/test/pgtest"
)

var (
	driverBin string
	// awsBin is the node plugin with the aws provider: the aws tests'
	// driver, as the chart runs it with providers.aws.enabled.
	awsBin string
	pg     *pgtest.Server
)

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	if os.Geteuid() != 0 {
		fmt.Println("e2e tests mount tmpfs and need root")
		return 1
	}
	dir, err := os.MkdirTemp("", "esc-e2e-bin-")
	if err != nil {
		fmt.Println(err)
		return 1
	}
	defer os.RemoveAll(dir)
	if driverBin, err = harness.Build(dir); err != nil {
		fmt.Println(err)
		return 1
	}
	if awsBin, err = harness.BuildAWS(dir); err != nil {
		fmt.Println(err)
		return 1
	}
	// 127.0.0.2 may log in too: a stolen credential's thief (use_test.go).
	if pg, err = pgtest.StartWith(pgtest.Options{ClientNets: []string{thiefAddr + "/32"}}); err != nil {
		fmt.Println(err)
		return 1
	}
	defer pg.Close()
	harness.RegisterLog(pg.LogFile)
	defer func() { // after the log check, which reads their logs
		if vaultSrv != nil {
			vaultSrv.Close()
		}
		if minio != nil {
			minio.Close()
		}
		if oidc != nil {
			oidc.Close()
		}
		if awsSecrets != nil {
			awsSecrets.Close()
		}
		if apiServer != nil {
			apiServer.Stop()
		}
	}()
	ctx := context.Background()
	if err := pg.Exec(ctx,
		`CREATE TABLE public.items (id int PRIMARY KEY, name text)`,
		`INSERT INTO public.items VALUES (1, 'first'), (2, 'second')`,
		`CREATE TABLE public.payroll (id int, salary int)`,
	); err != nil {
		fmt.Println(err)
		return 1
	}
	defer os.RemoveAll(harness.LogDir())
	code := m.Run()
	// Every log line of the suite (driver, audit, PostgreSQL's own) against
	// every password and token the suite issued or sent.
	return max(code, harness.ReportLogs())
}

// classes is the SecretProviderClass file of the suite.
const classes = `apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: app-db
  namespace: team-a
spec:
  provider: postgres
  parameters:
    connection: main
    role: reader
    files: |
      - path: username
        value: username
      - path: password
        value: password
      - path: dsn
        template: "postgres://{{ .username }}:{{ .password }}@{{ .host }}:{{ .port }}/{{ .database }}?sslmode=disable"
      - path: pg.env
        template: |
          PGHOST={{ .host }}
          PGPORT={{ .port }}
          PGDATABASE={{ .database }}
          PGUSER={{ .username }}
          PGPASSWORD={{ .password }}
      - path: config/db.json
        format: json
        mode: "0400"
---
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: short-lived
  namespace: team-a
spec:
  provider: postgres
  parameters:
    connection: main
    role: rotating
---
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: blocking
  namespace: team-a
spec:
  provider: postgres
  parameters:
    connection: main
    role: blocking
---
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: payroll
  namespace: team-a
spec:
  provider: postgres
  parameters:
    connection: main
    role: payroll
---
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: huge
  namespace: team-a
spec:
  provider: postgres
  parameters:
    connection: main
    role: reader
    files: |
      - path: big
        template: '{{ printf "%0900000d" 0 }}{{ printf "%0900000d" 0 }}'
---
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: escape
  namespace: team-a
spec:
  provider: postgres
  parameters:
    connection: main
    role: reader
    files: |
      - path: ../../etc/evil
        value: password
---
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: absolute
  namespace: team-a
spec:
  provider: postgres
  parameters:
    connection: main
    role: reader
    files: |
      - path: /etc/evil
        value: password
---
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: synced
  namespace: team-a
spec:
  provider: postgres
  parameters:
    connection: main
    role: reader
  secretObjects:
    - secretName: app-db
      type: Opaque
      data:
        - objectName: password
          key: password
`

// backends configures the postgres provider against the suite's server.
func backends(ttl, maxTTL string) string {
	return fmt.Sprintf(`postgres:
  connections:
    main:
      url: %s
      expectedSources: [127.0.0.1/32]
      roles:
        reader:
          defaultTTL: %s
          maxTTL: 1h
          creationStatements:
            - CREATE ROLE "{{.Name}}" LOGIN PASSWORD '{{.Password}}' VALID UNTIL '{{.Expiration}}'
            - GRANT SELECT ON public.items TO "{{.Name}}"
          allowed:
            - namespace: team-a
              serviceAccount: app
        rotating:
          defaultTTL: %s
          maxTTL: %s
          creationStatements:
            - CREATE ROLE "{{.Name}}" LOGIN PASSWORD '{{.Password}}' VALID UNTIL '{{.Expiration}}'
            - GRANT SELECT ON public.items TO "{{.Name}}"
          allowed:
            - namespace: team-a
              serviceAccount: "*"
        blocking:
          creationStatements:
            - CREATE ROLE "{{.Name}}" LOGIN PASSWORD '{{.Password}}' VALID UNTIL '{{.Expiration}}'
            - SELECT pg_advisory_xact_lock(4242)
          allowed:
            - namespace: team-a
              serviceAccount: app
        payroll:
          creationStatements:
            - CREATE ROLE "{{.Name}}" LOGIN PASSWORD '{{.Password}}' VALID UNTIL '{{.Expiration}}'
            - GRANT SELECT ON public.payroll TO "{{.Name}}"
          allowed:
            - namespace: team-a
              serviceAccount: payroll-job
`, pg.AdminURL(), ttl, ttl, maxTTL)
}

// fixture is one test's driver, environment and kubelet.
type fixture struct {
	env    *harness.Env
	driver *harness.Driver
	kube   *kubelet.Kubelet
	audit  string
}

// setup starts a driver with the suite's postgres classes and backends;
// extra flags follow.
func setup(t *testing.T, ttl, maxTTL string, extra ...string) *fixture {
	t.Helper()
	return startFixture(t, classes, backends(ttl, maxTTL), extra...)
}

// startFixture starts a driver in a fresh environment with these classes
// and backend configuration, and stops and removes it all at the end.
func startFixture(t *testing.T, classesYAML, backendsYAML string, extra ...string) *fixture {
	t.Helper()
	return startFixtureOf(t, driverBin, classesYAML, backendsYAML, extra...)
}

// startFixtureOf is startFixture with the driver binary bin.
func startFixtureOf(t *testing.T, bin, classesYAML, backendsYAML string, extra ...string) *fixture {
	t.Helper()
	env, err := harness.NewEnv()
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{env: env, audit: harness.LogPath("audit")}
	write := func(name, content string) string {
		p := filepath.Join(env.Base, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	args := append([]string{
		"--classes-file", write("classes.yaml", classesYAML),
		"--backend-config", write("backends.yaml", backendsYAML),
		"--audit-log", f.audit,
		"--retry-min", "200ms", "--retry-max", "1s", "--backend-timeout", "5s",
	}, extra...)
	f.driver = &harness.Driver{Bin: bin, Env: env, Args: args}
	if err := f.driver.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	if f.kube, err = kubelet.Dial(env.Endpoint(), env.KubeletDir); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		f.kube.Close()
		f.driver.Stop()
		if t.Failed() {
			t.Logf("driver log (tail):\n%s", f.driver.LogTail(4000))
		}
		if err := env.Close(); err != nil {
			t.Errorf("cleaning up: %v", err)
		}
	})
	return f
}

// readFile reads a file of a mounted volume that holds no secret.
func readFile(t *testing.T, target, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(target, name))
	if err != nil {
		t.Fatalf("reading %s: %v", name, err)
	}
	return strings.TrimSpace(string(b))
}

// readSecret reads a file of a mounted volume and remembers its content as a secret.
func readSecret(t *testing.T, target, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(target, name))
	if err != nil {
		t.Fatalf("reading %s: %v", name, err)
	}
	s := strings.TrimSpace(string(b))
	harness.RememberSecret(s)
	return s
}

// storageOf opens the fixture's state directory read-only in effect (it is
// already a tmpfs, so Open mounts nothing).
func storageOf(f *fixture) (*storage.Filesystem, error) {
	return storage.OpenExisting(f.env.StateDir)
}
