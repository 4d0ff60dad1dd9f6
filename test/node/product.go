package node

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/ephemeral-secrets/csi-driver/pkg/inventory"
	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/image"
	"github.com/ephemeral-secrets/csi-driver/test/pgtest"
)

// The images the node runs, built here under local names (nothing can be
// pulled): the driver, the example workload, and the sandbox image.
const (
	DriverRegistry   = "esc.local"
	DriverRepository = DriverRegistry + "/csi-driver"
	ImageTag         = "dev"
	DriverImage      = DriverRepository + ":" + ImageTag
	DBCheckImage     = "esc.local/db-check:" + ImageTag
	AgentTasksImage  = "esc.local/agent-tasks:" + ImageTag
)

// Images builds the driver, db-check and pause images into dir and
// returns the archives.
func Images(ctx context.Context, repoRoot, dir string) ([]string, error) {
	return ImagesOf(ctx, repoRoot, dir, "./cmd/ephemeral-secrets-csi")
}

// ImagesOf is Images with the driver's image built around another main
// package of the module (the benchmark's build, ./test/bench/driver), under
// the same name DriverImage, so ChartImageValues install it.
func ImagesOf(ctx context.Context, repoRoot, dir, driverPkg string) ([]string, error) {
	driver, err := image.DriverSpecOf(ctx, repoRoot, driverPkg, "", DriverImage, ImageTag)
	if err != nil {
		return nil, err
	}
	check, err := image.DBCheckSpec(ctx, repoRoot, "", DBCheckImage)
	if err != nil {
		return nil, err
	}
	agent, err := image.AgentTasksSpec(ctx, repoRoot, "", AgentTasksImage)
	if err != nil {
		return nil, err
	}
	pause, err := image.PauseSpec(ctx, repoRoot, "")
	if err != nil {
		return nil, err
	}
	var out []string
	for _, s := range []image.Spec{driver, check, agent, pause} {
		path := filepath.Join(dir, strings.NewReplacer("/", "_", ":", "_").Replace(s.Name)+".tar")
		if err := image.Write(path, s); err != nil {
			return nil, err
		}
		out = append(out, path)
	}
	return out, nil
}

// Database is the example's database on the node: PostgreSQL listening on
// the node's address too, so pods reach it over the pods' network.
type Database struct {
	*pgtest.Server
	// AdminPassword is the password of csi_admin, the driver's login.
	AdminPassword string
}

// StartDatabase starts PostgreSQL with the example's "shop" database: a
// table the example's role may read (orders) and one it may not
// (customers), and the CREATEROLE login the driver administers it with.
func StartDatabase(ctx context.Context) (*Database, error) {
	pg, err := pgtest.StartWith(pgtest.Options{Listen: []string{NodeIP}, ClientNets: []string{PodSubnet}})
	if err != nil {
		return nil, err
	}
	db := &Database{Server: pg, AdminPassword: "csi-admin-" + strconv.Itoa(os.Getpid())}
	harness.RememberSecret(db.AdminPassword)
	if err := pg.Exec(ctx,
		`CREATE DATABASE shop`,
		// Least privilege, as README's admin role: CREATEROLE and the grants
		// it hands on, and pg_read_all_stats (the issuer sees the sessions
		// of the roles it made: their use), nothing else (no superuser, no
		// pg_signal_backend).
		fmt.Sprintf(`CREATE ROLE csi_admin LOGIN CREATEROLE PASSWORD '%s'`, db.AdminPassword),
		`GRANT pg_read_all_stats TO csi_admin`,
	); err != nil {
		pg.Close()
		return nil, err
	}
	if err := pg.ExecIn(ctx, "shop",
		`CREATE TABLE orders (id int PRIMARY KEY, item text)`,
		`INSERT INTO orders VALUES (1, 'tea'), (2, 'bread')`,
		`CREATE TABLE customers (id int PRIMARY KEY, name text)`,
		// The admin may grant only what it holds, with grant option.
		`GRANT SELECT ON orders TO csi_admin WITH GRANT OPTION`,
	); err != nil {
		pg.Close()
		return nil, err
	}
	return db, nil
}

// Backends rewrites an example's backend configuration for this node: the
// connection's address is the node's database, its login csi_admin's.
// Nothing else of the file changes.
func (db *Database) Backends(example []byte) ([]byte, error) {
	var cfg map[string]any
	if err := yaml.Unmarshal(example, &cfg); err != nil {
		return nil, err
	}
	pgCfg, _ := cfg["postgres"].(map[string]any)
	conns, _ := pgCfg["connections"].(map[string]any)
	if len(conns) == 0 {
		return nil, fmt.Errorf("backend configuration has no postgres connections")
	}
	for _, c := range conns {
		conn := c.(map[string]any)
		conn["url"] = fmt.Sprintf("postgres://csi_admin:%s@%s:%d/shop?sslmode=disable", db.AdminPassword, NodeIP, db.Port)
		conn["host"], conn["port"] = NodeIP, strconv.Itoa(db.Port)
	}
	return yaml.Marshal(cfg)
}

// ExampleBackends is the postgres example's backend configuration
// (examples/postgres/admin/backends.yaml) rewritten by Backends for this
// node's database: the configuration the example's class needs.
func (db *Database) ExampleBackends(repoRoot string) ([]byte, error) {
	example, err := os.ReadFile(filepath.Join(repoRoot, "examples/postgres/admin/backends.yaml"))
	if err != nil {
		return nil, err
	}
	return db.Backends(example)
}

// ExampleRolePrefix begins the name of every role minted for the postgres
// example's service account (esc_<namespace>_<service account>_).
const ExampleRolePrefix = "esc_ai_agents_research_agent_"

// PostgresProfile are the helm arguments of the install that serves
// PostgreSQL through the issuer, the profile examples/postgres needs.
func PostgresProfile() []string { return []string{"--set", "providers.postgres.enabled=true"} }

// WaitNoCredentials waits (up to timeout) until namespace holds no
// Credential object and the database no role whose name begins with
// rolePrefix: every credential minted there was revoked and its record
// removed. Its error says what is left.
func (n *Node) WaitNoCredentials(ctx context.Context, db *Database, namespace, rolePrefix string, timeout time.Duration) error {
	inv, err := inventory.NewClient(n.Config())
	if err != nil {
		return err
	}
	return poll(ctx, timeout, func() error {
		creds, err := inv.List(ctx, namespace, metav1.ListOptions{})
		if err != nil {
			return err
		}
		roles, err := db.CountRoles(ctx, rolePrefix)
		if err != nil {
			return err
		}
		if len(creds.Items) != 0 || roles != 0 {
			return fmt.Errorf("%d Credential objects left in namespace %s, %d roles %s* left in the database", len(creds.Items), namespace, roles, rolePrefix)
		}
		return nil
	})
}

// SplitBackends splits a backend configuration as the chart's defaults
// want it: the postgres section for the issuer's Secret, the rest for the
// node plugins'.
func SplitBackends(backends []byte) (issuerPart, nodePart []byte, err error) {
	var cfg map[string]any
	if err := yaml.Unmarshal(backends, &cfg); err != nil {
		return nil, nil, err
	}
	pg := map[string]any{}
	if v, ok := cfg["postgres"]; ok {
		pg["postgres"] = v
		delete(cfg, "postgres")
	}
	if issuerPart, err = yaml.Marshal(pg); err != nil {
		return nil, nil, err
	}
	if cfg == nil {
		cfg = map[string]any{}
	}
	nodePart, err = yaml.Marshal(cfg)
	return issuerPart, nodePart, err
}

// CSINodeTimeout bounds the wait for kubelet to register the driver.
const CSINodeTimeout = 2 * time.Minute

// Namespace the driver is installed into.
const Namespace = "ephemeral-secrets"

// InstallDriver installs the chart with helm, only the images overridden,
// after the backend configuration's Secret. extra are more helm arguments.
func (n *Node) InstallDriver(ctx context.Context, repoRoot string, backends []byte, extra ...string) error {
	return n.InstallDriverWithFiles(ctx, repoRoot, backends, nil, extra...)
}

// InstallDriverWithFiles is InstallDriver with more keys in the node
// plugins' backend Secret: files the configuration names (a CA
// certificate), which the driver reads in /etc/ephemeral-secrets/backends.
func (n *Node) InstallDriverWithFiles(ctx context.Context, repoRoot string, backends []byte, files map[string][]byte, extra ...string) error {
	if _, err := n.Clients.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{
		Name:   Namespace,
		Labels: map[string]string{"pod-security.kubernetes.io/enforce": "privileged"},
	}}, metav1.CreateOptions{}); err != nil {
		return err
	}
	issuerPart, nodePart, err := SplitBackends(backends)
	if err != nil {
		return err
	}
	nodeFiles := map[string][]byte{"backends.yaml": nodePart}
	for k, v := range files {
		nodeFiles[k] = v
	}
	for name, data := range map[string]map[string][]byte{"ephemeral-secrets-issuer": {"backends.yaml": issuerPart}, "ephemeral-secrets-backends": nodeFiles} {
		if _, err := n.Clients.CoreV1().Secrets(Namespace).Create(ctx, &corev1.Secret{
			ObjectMeta: metav1.ObjectMeta{Name: name},
			Data:       data,
		}, metav1.CreateOptions{}); err != nil {
			return err
		}
	}
	args := append([]string{"install", "ephemeral-secrets-csi", filepath.Join(repoRoot, "deploy/helm/ephemeral-secrets-csi"),
		"--namespace", Namespace, "--wait", "--timeout", "3m"}, ChartImageValues()...)
	if _, err := n.Helm(ctx, append(args, extra...)...); err != nil {
		return err
	}
	return n.WaitDriverRegistered(ctx)
}

// ChartImageValues are the helm arguments that point the chart at the
// images built here.
func ChartImageValues() []string {
	return []string{"--set", "driver.image.registry=" + DriverRegistry, "--set", "driver.image.repository=csi-driver",
		"--set", "driver.image.tag=" + ImageTag, "--set", "driver.image.pullPolicy=Never"}
}

// Helm runs helm against the node's API server.
func (n *Node) Helm(ctx context.Context, args ...string) ([]byte, error) {
	bin, err := harness.Tool("helm")
	if err != nil {
		return nil, err
	}
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = append(os.Environ(), "KUBECONFIG="+n.Kubeconfig, "HELM_CACHE_HOME="+filepath.Join(n.Work, "helm"),
		"HELM_CONFIG_HOME="+filepath.Join(n.Work, "helm"), "HELM_DATA_HOME="+filepath.Join(n.Work, "helm"))
	out, err := cmd.CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("helm %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return out, nil
}

// WaitDriverRegistered waits until the node's CSINode lists the driver:
// kubelet has registered it and may call it.
func (n *Node) WaitDriverRegistered(ctx context.Context) error {
	return poll(ctx, CSINodeTimeout, func() error {
		cn, err := n.Clients.StorageV1().CSINodes().Get(ctx, Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if !hasDriver(cn) {
			return fmt.Errorf("CSINode %s does not list the driver yet", Name)
		}
		return nil
	})
}

func hasDriver(cn *storagev1.CSINode) bool {
	for _, d := range cn.Spec.Drivers {
		if d.Name == "ephemeral-secrets.csi.dev" {
			return true
		}
	}
	return false
}
