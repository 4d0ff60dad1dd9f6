// Command demo shows the driver end to end on one machine: a throwaway
// PostgreSQL on 127.0.0.1, the real driver binary on a CSI socket, and a
// small kubelet of ours publishing a pod's volume. It prints what a person
// would want to see at each stage, cleans up, and exits non-zero if any
// step fails. Run it as root through "make demo".
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/kubelet"
	"github.com/ephemeral-secrets/csi-driver/test/pgtest"
)

func main() {
	bin := flag.String("driver", "bin/ephemeral-secrets-csi", "driver binary")
	flag.Parse()
	if err := run(*bin); err != nil {
		fmt.Fprintf(os.Stderr, "\nDEMO FAILED: %v\n", err)
		os.Exit(1)
	}
	fmt.Println("\nDemo finished: every step succeeded, and everything it started is stopped and removed.")
}

func step(format string, args ...any) {
	fmt.Printf("\n\033[1m==> "+format+"\033[0m\n", args...)
}

func run(bin string) (err error) {
	if os.Geteuid() != 0 {
		return errors.New("run as root: the driver mounts tmpfs")
	}
	if bin, err = filepath.Abs(bin); err != nil {
		return err
	}
	ctx := context.Background()

	step("Starting a throwaway PostgreSQL on 127.0.0.1")
	pg, err := pgtest.Start()
	if err != nil {
		return err
	}
	defer pg.Close()
	fmt.Printf("    port %d; tables: public.orders (the agent may read it), public.salaries (it may not)\n", pg.Port)
	if err := pg.Exec(ctx,
		`CREATE TABLE public.orders (id int PRIMARY KEY, item text, qty int)`,
		`INSERT INTO public.orders VALUES (1, 'keyboard', 2), (2, 'monitor', 1), (3, 'cable', 7)`,
		`CREATE TABLE public.salaries (name text, amount int)`,
	); err != nil {
		return err
	}

	env, err := harness.NewEnv()
	if err != nil {
		return err
	}
	defer env.Close()
	classes := filepath.Join(env.Base, "classes.yaml")
	backends := filepath.Join(env.Base, "backends.yaml")
	auditLog := filepath.Join(env.Base, "audit.log")
	if err := os.WriteFile(classes, []byte(classesYAML+taskClassYAML+"\n"), 0o600); err != nil {
		return err
	}
	if err := os.WriteFile(backends, []byte(fmt.Sprintf(backendsYAML, pg.AdminURL())), 0o600); err != nil {
		return err
	}

	step("Starting the driver (%s) on %s", filepath.Base(bin), env.Endpoint())
	drv := &harness.Driver{Bin: bin, Env: env, LogFile: filepath.Join(env.Base, "driver.log"), Args: []string{
		"--classes-file", classes, "--backend-config", backends, "--audit-log", auditLog,
		"--retry-min", "200ms", "--retry-max", "2s",
	}}
	if err := drv.Start(ctx); err != nil {
		return err
	}
	defer drv.Stop()
	fmt.Println("    the SecretProviderClass it serves:")
	indent(classesYAML, "      ")

	kube, err := kubelet.Dial(env.Endpoint(), env.KubeletDir)
	if err != nil {
		return err
	}
	defer kube.Close()
	pod := kubelet.NewPod("ai-agents", "research-agent-7f9c", "research-agent")
	vol := kubelet.Volume{Name: "db-creds", Attributes: map[string]string{"secretProviderClass": "orders-db"}, MountGroup: "2000", ReadOnly: true}

	step("kubelet: NodePublishVolume for pod %s/%s (service account %s, fsGroup 2000)", pod.Namespace, pod.Name, pod.ServiceAccount)
	start := time.Now()
	target, err := kube.Publish(ctx, pod, vol)
	if err != nil {
		return fmt.Errorf("publish: %w", err)
	}
	fmt.Printf("    OK in %s; mounted at %s\n", time.Since(start).Round(time.Millisecond), target)

	step("What the pod sees")
	if err := listFiles(target); err != nil {
		return err
	}
	opts, fstype, super, ok := harness.MountOptions(target)
	if !ok {
		return errors.New("target is not a mount point")
	}
	fmt.Printf("    mount: %s %s (%s)\n", fstype, strings.Join(opts, ","), super)
	if err := os.WriteFile(filepath.Join(target, "tamper"), nil, 0o600); !errors.Is(err, syscall.EROFS) {
		return fmt.Errorf("writing into the volume was not refused as read-only: %v", err)
	}
	fmt.Println("    a write into the volume: refused (read-only file system)")
	user, password, err := readCreds(target)
	if err != nil {
		return err
	}
	fmt.Printf("    username: %s\n    password: %s… (%d characters; never printed, logged or stored on disk)\n", user, password[:4], len(password))

	step("The agent uses its credentials")
	conn, err := pgx.Connect(ctx, pg.URL(user, password))
	if err != nil {
		return fmt.Errorf("login with the issued credentials: %w", err)
	}
	var n, qty int
	if err := conn.QueryRow(ctx, `SELECT count(*), sum(qty) FROM public.orders`).Scan(&n, &qty); err != nil {
		return fmt.Errorf("granted query: %w", err)
	}
	fmt.Printf("    SELECT count(*), sum(qty) FROM orders   -> %d rows, %d items  (granted)\n", n, qty)
	_, err = conn.Exec(ctx, `SELECT * FROM public.salaries`)
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "42501" {
		return fmt.Errorf("the query outside the grant was not refused: %v", err)
	}
	fmt.Printf("    SELECT * FROM salaries                  -> refused: %s\n", pgErr.Message)
	step("The issuer sees the agent's session (it samples the sessions of the roles it made every --use-interval, 1s)")
	detail, err := waitUse(auditLog, pod.Name, "first", 10*time.Second)
	if err != nil {
		return err
	}
	fmt.Printf("    audit, stage use: %s (the backend file expects 127.0.0.0/8; any other address is a foreign use)\n", detail)
	conn.Close(ctx)

	step("An admin asks: what credentials are alive on this node? (ephemeral-secrets-csi leases)")
	if err := showLeases(bin, env.StateDir); err != nil {
		return err
	}

	step("kubelet: NodeUnpublishVolume (the pod is deleted)")
	start = time.Now()
	if err := kube.Unpublish(ctx, pod, vol.Name); err != nil {
		return fmt.Errorf("unpublish: %w", err)
	}
	fmt.Printf("    OK in %s (the revocation is queued durably and runs in the background)\n", time.Since(start).Round(time.Millisecond))
	if _, err := os.Stat(target); !os.IsNotExist(err) {
		return fmt.Errorf("the target is still there: %v", err)
	}
	fmt.Println("    the mount and its files are gone")
	deadline := time.Now().Add(15 * time.Second)
	for {
		exists, err := pg.RoleExists(ctx, user)
		if err == nil && !exists {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("role %s still exists 15 s after unpublish (%v)", user, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	fmt.Printf("    role %s: dropped in PostgreSQL %s after unpublish returned\n", user, time.Since(start).Round(time.Millisecond))
	if c, err := pgx.Connect(ctx, pg.URL(user, password)); err == nil {
		c.Close(ctx)
		return errors.New("the revoked credentials still log in")
	} else {
		fmt.Printf("    login with the old credentials -> refused: %s\n", shortErr(err))
	}

	if _, err := waitUse(auditLog, pod.Name, "summary", 10*time.Second); err != nil {
		return err
	}
	step("The audit trail (%s)", auditLog)
	if err := showAudit(auditLog, pod.Name); err != nil {
		return err
	}
	if err := taskAct(ctx, env, kube, pg, auditLog); err != nil {
		return err
	}
	step("Cleaning up")
	return nil
}

func indent(s, prefix string) {
	for _, line := range strings.Split(strings.TrimRight(s, "\n"), "\n") {
		fmt.Println(prefix + line)
	}
}

// listFiles prints the volume as the pod sees it: modes and owners through
// the symlinks, hidden entries of the atomic writer left out.
func listFiles(dir string) error {
	return listDir(dir, "")
}

func listDir(dir, prefix string) error {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), "..") {
			continue
		}
		p := filepath.Join(dir, e.Name())
		st, err := os.Stat(p)
		if err != nil {
			return err
		}
		sys := st.Sys().(*syscall.Stat_t)
		kind := "file"
		if st.IsDir() {
			kind = "dir "
		}
		fmt.Printf("    %s %s  %d:%d  %4d bytes  %s\n", kind, st.Mode().Perm(), sys.Uid, sys.Gid, st.Size(), prefix+e.Name())
		if st.IsDir() {
			if err := listDir(p, prefix+e.Name()+"/"); err != nil {
				return err
			}
		}
	}
	return nil
}

func readCreds(target string) (string, string, error) {
	u, err := os.ReadFile(filepath.Join(target, "username"))
	if err != nil {
		return "", "", err
	}
	p, err := os.ReadFile(filepath.Join(target, "password"))
	if err != nil {
		return "", "", err
	}
	if len(p) < 8 {
		return "", "", errors.New("password file is too short")
	}
	return strings.TrimSpace(string(u)), strings.TrimSpace(string(p)), nil
}

func showLeases(bin, stateDir string) error {
	out, err := exec.Command(bin, "leases", "--state-dir", stateDir).CombinedOutput()
	indent(string(out), "    ")
	return err
}

// showAudit prints the audit records of pod name.
func showAudit(path, name string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	fmt.Printf("    %-12s %-8s %-9s %-30s %-38s %-10s %s\n", "TIME", "STAGE", "OUTCOME", "POD", "LEASE", "TASK", "DETAIL")
	for sc.Scan() {
		var r struct {
			Time                          time.Time
			Stage, Outcome, Detail, Error string
			LeaseID                       string `json:"lease_id"`
			Task                          string
			Lifetime                      string
			FirstSeen                     bool `json:"first_seen"`
			Pod                           struct{ Namespace, Name string }
		}
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			return err
		}
		if r.Pod.Name != name {
			continue
		}
		detail := strings.TrimSpace(r.Detail + " " + r.Error)
		if r.Lifetime != "" {
			detail += " (lived " + r.Lifetime + ")"
		}
		if r.FirstSeen {
			detail = strings.TrimSpace(detail + " first request of this service account for this class on the node")
		}
		fmt.Printf("    %-12s %-8s %-9s %-30s %-38s %-10s %s\n", r.Time.Format("15:04:05.000"), r.Stage, r.Outcome,
			r.Pod.Namespace+"/"+r.Pod.Name, r.LeaseID, r.Task, detail)
	}
	return sc.Err()
}

// waitUse waits for the audit record of stage use and event of pod name,
// and returns its detail.
func waitUse(path, name, event string, timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	for {
		data, err := os.ReadFile(path)
		if err != nil {
			return "", err
		}
		for line := range strings.SplitSeq(strings.TrimSpace(string(data)), "\n") {
			var r struct {
				Stage, Detail string
				Pod           struct{ Name string }
				Use           struct{ Event string }
			}
			if json.Unmarshal([]byte(line), &r) == nil && r.Stage == "use" && r.Pod.Name == name && r.Use.Event == event {
				return r.Detail, nil
			}
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("no use record %q of pod %s in the audit trail within %s", event, name, timeout)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func shortErr(err error) string {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return pgErr.Message
	}
	return err.Error()
}

const classesYAML = `apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: orders-db
  namespace: ai-agents
spec:
  provider: postgres
  parameters:
    connection: shop
    role: orders-reader
    ttl: 15m
    files: |
      - path: username
        value: username
      - path: password
        value: password
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
`

const backendsYAML = `postgres:
  connections:
    shop:
      url: %s
      expectedSources: [127.0.0.0/8]
      roles:
        orders-reader:
          defaultTTL: 1h
          maxTTL: 24h
          creationStatements:
            - CREATE ROLE "{{.Name}}" LOGIN PASSWORD '{{.Password}}' VALID UNTIL '{{.Expiration}}'
            - GRANT SELECT ON public.orders TO "{{.Name}}"
          allowed:
            - namespace: ai-agents
              serviceAccount: research-agent
`
