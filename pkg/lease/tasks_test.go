package lease

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider/postgres"
	"github.com/ephemeral-secrets/csi-driver/pkg/spc"
)

// podRoles counts the roles of pod name alive in PostgreSQL.
func podRoles(n *node, name string) int {
	c := 0
	for role := range n.alive(context.Background()) {
		if strings.HasPrefix(role, n.prefix+name+"_") {
			c++
		}
	}
	return c
}

func TestTaskLeases(t *testing.T) {
	ctx := context.Background()
	n := newNode(t, time.Hour)
	m := n.manager(n.store, n.pg, Options{})
	defer m.Close()
	if err := m.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	go m.Run(ctx)
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
	ua, _ := os.ReadFile(filepath.Join(taskDir("a"), "username"))
	ub, _ := os.ReadFile(filepath.Join(taskDir("b"), "username"))
	if a.LeaseID == b.LeaseID || len(ua) == 0 || string(ua) != postgres.RoleName(a.LeaseID) || string(ub) != postgres.RoleName(b.LeaseID) {
		t.Fatalf("two tasks do not hold roles of their own: %+v %+v (users %q %q)", a, b, ua, ub)
	}
	for _, dir := range []string{v.TargetPath, taskDir("a"), taskDir("b")} {
		if err := login(ctx, dir); err != nil {
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
	before := podRoles(n, "tk1")
	if _, err := m.IssueTask(ctx, v.ID, "e", 0); !errors.Is(err, ErrTaskLimit) {
		t.Errorf("a fifth task: %v, want ErrTaskLimit", err)
	}
	if after := podRoles(n, "tk1"); after != before {
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
	if err := <-confirmed; err != nil {
		t.Fatal(err)
	}
	if n.alive(ctx)[postgres.RoleName(a.LeaseID)] {
		t.Error("task a's role alive after its confirmed revocation")
	}
	if err := login(ctx, taskDir("a")); err == nil {
		t.Error("task a's files still log in")
	}
	if err := login(ctx, taskDir("b")); err != nil {
		t.Errorf("task b stopped working: %v", err)
	}
	if _, err := m.RevokeTask(ctx, v.ID, "a"); !errors.Is(err, ErrUnknownTask) {
		t.Errorf("task a revoked twice: %v", err)
	}

	// A short TTL ends the task by itself.
	if _, err := m.RevokeTask(ctx, v.ID, "c"); err != nil {
		t.Fatal(err)
	}
	short, err := m.IssueTask(ctx, v.ID, "short", 500*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "the short task's role dropped at its TTL", func() bool {
		return !n.alive(ctx)[postgres.RoleName(short.LeaseID)]
	})
	if info, _ := m.Info(v.ID); len(info.Tasks) != 2 {
		t.Errorf("tasks after the short one ended: %+v", info.Tasks)
	}

	// A rotation of the volume's own lease keeps the tasks' files.
	if _, err := m.RotateNow(ctx, v.ID); err != nil {
		t.Fatal(err)
	}
	if err := login(ctx, taskDir("b")); err != nil {
		t.Errorf("task b after a rotation: %v", err)
	}

	// Withdrawing the volume revokes its tasks too.
	confirmed, err = m.Withdraw(ctx, v.ID, "given back")
	if err != nil {
		t.Fatal(err)
	}
	if err := <-confirmed; err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "every role of the pod dropped", func() bool { return podRoles(n, "tk1") == 0 })
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
	eventually(t, 10*time.Second, "the unpublished pod's task role dropped", func() bool { return podRoles(n, "tk2") == 0 })

	// Without the lease socket there are no tasks.
	u := n.volume("tk3")
	publish(t, m, u)
	if _, err := m.IssueTask(ctx, u.ID, "x", 0); !errors.Is(err, ErrNoLeaseAPI) {
		t.Errorf("a task of a class without the socket: %v", err)
	}
	unpublish(t, m, u)
}
