package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/kubelet"
	"github.com/ephemeral-secrets/csi-driver/test/pgtest"
)

// taskAct is the demo's second act: an agent that runs two tasks in one
// pod, each with a credential of its own from the volume's lease socket,
// and gives each back when done.
func taskAct(ctx context.Context, env *harness.Env, kube *kubelet.Kubelet, pg *pgtest.Server, auditLog string) error {
	pod := kubelet.NewPod("ai-agents", "agent-runner-2b1d", "research-agent")
	vol := kubelet.Volume{Name: "db", Attributes: map[string]string{"secretProviderClass": "orders-db-tasks"}, MountGroup: "2000", ReadOnly: true}

	step("Act two: an agent asks for a credential per task (class orders-db-tasks, leaseAPI: \"true\")")
	target, err := kube.Publish(ctx, pod, vol)
	if err != nil {
		return fmt.Errorf("publish: %w", err)
	}
	if err := listFiles(target); err != nil {
		return err
	}
	fmt.Println("    lease.sock is the volume's lease socket: root:2000 0660, so the pod's fsGroup may call it")

	dir, err := os.MkdirTemp("", "esc-demo-agent-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	if err := os.Chmod(dir, 0o755); err != nil {
		return err
	}
	bin, err := harness.BuildPackage(dir, "./examples/agent-tasks")
	if err != nil {
		return err
	}
	// The agent runs as uid 1000 in the fsGroup and sees the volume as
	// the pod does; /proc/self/fd/3 stands in for its mount path.
	view, err := os.OpenFile(env.InPodView(target), unix.O_PATH|unix.O_DIRECTORY, 0)
	if err != nil {
		return err
	}
	defer view.Close()
	step("The agent (examples/agent-tasks, uid 1000, group 2000) runs tasks \"summarise\" and \"report\"")
	cmd := exec.Command(bin, "--volume", "/proc/self/fd/3", "--tasks", "summarise,report",
		"--query", "SELECT count(*) FROM public.orders", "--give-back")
	cmd.ExtraFiles = []*os.File{view}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 1000, Gid: 2000}}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err = cmd.Run()
	indent(out.String(), "    ")
	if err != nil {
		return fmt.Errorf("agent-tasks: %w", err)
	}
	if n, err := pg.CountRoles(ctx, "esc_ai_agents_agent_runner_2b1d_"); err != nil || n != 0 {
		return fmt.Errorf("%d roles of the agent's pod left after it gave everything back (%v)", n, err)
	}
	fmt.Println("    PostgreSQL: no role of the pod is left, and the pod still runs with its (empty) volume mounted")

	step("The audit trail of the agent's pod: each task from issue to revoke, every socket call")
	if err := showAudit(auditLog, pod.Name); err != nil {
		return err
	}
	start := time.Now()
	if err := kube.Unpublish(ctx, pod, vol.Name); err != nil {
		return fmt.Errorf("unpublish: %w", err)
	}
	fmt.Printf("\n    the pod is deleted: unpublish OK in %s, nothing left to revoke\n", time.Since(start).Round(time.Millisecond))
	return nil
}

// taskClassYAML is the class of act two.
var taskClassYAML = strings.TrimSpace(`
---
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: orders-db-tasks
  namespace: ai-agents
spec:
  provider: postgres
  parameters:
    connection: shop
    role: orders-reader
    ttl: 15m
    leaseAPI: "true"
    maxTasks: "2"
    files: |
      - path: username
        value: username
      - path: password
        value: password
      - path: dsn
        template: "postgres://{{ .username }}:{{ .password }}@{{ .host }}:{{ .port }}/{{ .database }}?sslmode=disable"
`)
