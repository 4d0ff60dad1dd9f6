package lease

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/spc"
)

func TestTaskLeases(t *testing.T) { inTiers(t, time.Hour, testTaskLeases) }

// testTaskLeases works the revocation queue in the test's goroutine
// (drain) and steps the node's clock to a task's end.
func testTaskLeases(t *testing.T, n *node) {
	ctx := context.Background()
	m := n.manager(n.store, n.prov, Options{Clock: n.clk})
	defer m.Close()
	if err := m.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	v := n.volume("tk1")
	v.Attributes[spc.ClassKey], v.Mount.Class = "db-tasks", "db-tasks"
	publish(t, m, v)
	taskDir := func(id string) string { return filepath.Join(v.TargetPath, "tasks", id) }

	a, err := m.IssueTask(ctx, v.ID, "a", 0)
	if err != nil {
		t.Fatal(err)
	}
	b, err := m.IssueTask(ctx, v.ID, "b", 0)
	if err != nil {
		t.Fatal(err)
	}
	ua, _ := n.files.readFile(filepath.Join(taskDir("a"), "username"))
	ub, _ := n.files.readFile(filepath.Join(taskDir("b"), "username"))
	if a.LeaseID == b.LeaseID || len(ua) == 0 || string(ua) != n.credential(a.LeaseID) || string(ub) != n.credential(b.LeaseID) {
		t.Fatalf("two tasks do not hold roles of their own: %+v %+v (users %q %q)", a, b, ua, ub)
	}
	for _, dir := range []string{v.TargetPath, taskDir("a"), taskDir("b")} {
		if err := n.login(ctx, dir); err != nil {
			t.Errorf("%s: %v", dir, err)
		}
	}
	// Bad IDs, a task twice.
	for _, id := range []string{"", "A", "a_b", "-a", strings.Repeat("a", 64), "../x"} {
		if _, err := m.IssueTask(ctx, v.ID, id, 0); !errors.Is(err, ErrInvalidTask) {
			t.Errorf("task %q: %v, want ErrInvalidTask", id, err)
		}
	}
	if _, err := m.IssueTask(ctx, v.ID, "a", 0); !errors.Is(err, ErrTaskExists) {
		t.Errorf("task a twice: %v", err)
	}
	// Up to the class's cap (4 by default), then refused with no role made.
	for _, id := range []string{"c", "d"} {
		if _, err := m.IssueTask(ctx, v.ID, id, 0); err != nil {
			t.Fatal(err)
		}
	}
	before := n.podCredentials("tk1")
	if _, err := m.IssueTask(ctx, v.ID, "e", 0); !errors.Is(err, ErrTaskLimit) {
		t.Errorf("a fifth task: %v, want ErrTaskLimit", err)
	}
	if after := n.podCredentials("tk1"); after != before {
		t.Errorf("the refused task made a role: %d, then %d", before, after)
	}

	// The admin's caps count them: the volume's credential and four tasks.
	if in, on := m.Live(testNS); in != 5 || on != 5 {
		t.Errorf("live credentials %d in the namespace, %d on the node; want 5 and 5", in, on)
	}

	// An admin's inventory lists the task leases beside the volume's.
	inv, err := ReadInventory(n.store)
	if err != nil {
		t.Fatal(err)
	}
	listed := map[string]string{}
	for _, l := range inv.Live {
		listed[l.Task] = l.LeaseID
	}
	if listed["a"] != a.LeaseID || listed["b"] != b.LeaseID || listed[""] == "" {
		t.Errorf("inventory lists %v, want the volume's lease and tasks a and b", listed)
	}

	// One task given back: its login refused, the others work.
	confirmed, err := m.RevokeTask(ctx, v.ID, "a")
	if err != nil {
		t.Fatal(err)
	}
	m.drain(ctx)
	if err := <-confirmed; err != nil {
		t.Fatal(err)
	}
	if n.alive(ctx)[n.credential(a.LeaseID)] {
		t.Error("task a's role alive after its confirmed revocation")
	}
	if err := n.login(ctx, taskDir("a")); err == nil {
		t.Error("task a's files still log in")
	}
	if err := n.login(ctx, taskDir("b")); err != nil {
		t.Errorf("task b stopped working: %v", err)
	}
	if _, err := m.RevokeTask(ctx, v.ID, "a"); !errors.Is(err, ErrUnknownTask) {
		t.Errorf("task a revoked twice: %v", err)
	}

	// A short TTL ends the task by itself.
	if _, err := m.RevokeTask(ctx, v.ID, "c"); err != nil {
		t.Fatal(err)
	}
	short, err := m.IssueTask(ctx, v.ID, "short", 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	n.clk.Step(29 * time.Second)
	m.drain(ctx)
	if !n.alive(ctx)[n.credential(short.LeaseID)] {
		t.Fatal("the short task's credential ended before its TTL")
	}
	n.clk.Step(time.Second) // its end: the timer's goroutine queues its revocation
	eventually(t, 10*time.Second, "the short task's credential revoked at its TTL", func() bool {
		m.drain(ctx)
		return !n.alive(ctx)[n.credential(short.LeaseID)]
	})
	if info, _ := m.Info(v.ID); len(info.Tasks) != 2 {
		t.Errorf("tasks after the short one ended: %+v", info.Tasks)
	}

	// A rotation of the volume's own lease keeps the tasks' files.
	if _, err := m.RotateNow(ctx, v.ID); err != nil {
		t.Fatal(err)
	}
	if err := n.login(ctx, taskDir("b")); err != nil {
		t.Errorf("task b after a rotation: %v", err)
	}

	// Withdrawing the volume revokes its tasks too.
	confirmed, err = m.Withdraw(ctx, v.ID, "given back")
	if err != nil {
		t.Fatal(err)
	}
	m.drain(ctx)
	if err := <-confirmed; err != nil {
		t.Fatal(err)
	}
	if c := n.podCredentials("tk1"); c != 0 {
		t.Errorf("%d credentials of the pod alive after its withdrawal was confirmed", c)
	}
	if _, err := m.IssueTask(ctx, v.ID, "late", 0); !errors.Is(err, ErrWithdrawn) {
		t.Errorf("a task after the withdrawal: %v", err)
	}
	unpublish(t, m, v)

	// Unpublish revokes tasks.
	w := n.volume("tk2")
	w.Attributes[spc.ClassKey], w.Mount.Class = "db-tasks", "db-tasks"
	publish(t, m, w)
	if _, err := m.IssueTask(ctx, w.ID, "x", 0); err != nil {
		t.Fatal(err)
	}
	unpublish(t, m, w)
	m.drain(ctx)
	if c := n.podCredentials("tk2"); c != 0 {
		t.Errorf("%d credentials of the unpublished pod alive after the queue drained", c)
	}

	// Without the lease socket there are no tasks.
	u := n.volume("tk3")
	publish(t, m, u)
	if _, err := m.IssueTask(ctx, u.ID, "x", 0); !errors.Is(err, ErrNoLeaseAPI) {
		t.Errorf("a task of a class without the socket: %v", err)
	}
	unpublish(t, m, u)
}
