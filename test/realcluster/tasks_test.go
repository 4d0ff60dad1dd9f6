package realcluster

import (
	"context"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/ephemeral-secrets/csi-driver/pkg/audit"
	"github.com/ephemeral-secrets/csi-driver/test/node"
)

// testAgentTasksExample applies examples/agent-tasks: its container, a
// non-root user of the pod's fsGroup, speaks HTTP to the volume's lease
// socket through kubelet's read-only bind of the volume into the
// container, runs two tasks with roles of their own, gives each back and
// then the pod's own credential, and checks each login is refused after.
func testAgentTasksExample(t *testing.T) {
	ctx := context.Background()
	applyExampleWith(t, "examples/agent-tasks", strings.NewReplacer(
		"ghcr.io/ephemeral-secrets/agent-tasks:0.1.0", node.AgentTasksImage,
		"sslmode=verify-full", "sslmode=disable", // the node's database has no TLS
	))
	pod := waitPod(t, "ai-agents", "agent-runner", 2*time.Minute, corev1.PodSucceeded, corev1.PodFailed)
	logs := podLogs(t, "ai-agents", "agent-runner", "agent")
	if pod.Status.Phase != corev1.PodSucceeded {
		t.Fatalf("the agent failed:\n%s", logs)
	}
	for _, want := range []string{
		"task summarise: SELECT count(*) FROM orders as esc_ai_agents_agent_runner_",
		"task summarise: login refused", "task report: still works", "task report: login refused",
		"the volume's credential given back: revoked: the backend confirmed",
		"the volume's credential: login refused", "done:",
	} {
		if !strings.Contains(logs, want) {
			t.Fatalf("the agent's log lacks %q:\n%s", want, logs)
		}
	}
	if n, err := db.CountRoles(ctx, "esc_ai_agents_agent_runner_"); err != nil || n != 0 {
		t.Fatalf("%d roles of the agent pod left after every give-back (%v)", n, err)
	}
	rs := auditRecords(t, driverPod(t))
	tasks := map[string][]string{}
	for _, r := range recordsOf(rs, "agent-runner", audit.Issue) {
		tasks[r.Task] = append(tasks[r.Task], "issue")
	}
	for _, r := range recordsOf(rs, "agent-runner", audit.Revoke) {
		if r.Outcome == audit.Success {
			tasks[r.Task] = append(tasks[r.Task], "revoke")
		}
	}
	for _, task := range []string{"", "summarise", "report"} {
		if got := strings.Join(tasks[task], ","); got != "issue,revoke" {
			t.Errorf("audit of the agent's lease %q: %s, want issue,revoke", task, got)
		}
	}
	if n := len(recordsOf(rs, "agent-runner", audit.API)); n < 6 {
		t.Errorf("%d socket calls audited, want 6", n)
	}
	deletePod(t, "ai-agents", "agent-runner")
}
