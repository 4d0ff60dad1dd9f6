package lease

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/spc"
	"github.com/ephemeral-secrets/csi-driver/test/crashstore"
	"github.com/ephemeral-secrets/csi-driver/test/faults"
)

// revokeRecorder passes calls to the real provider and remembers the
// lease each Revoke was given.
type revokeRecorder struct {
	provider.Provider
	mu      sync.Mutex
	revoked map[string]provider.Lease
}

func (r *revokeRecorder) Revoke(ctx context.Context, l provider.Lease) error {
	err := r.Provider.Revoke(ctx, l)
	if err == nil {
		r.mu.Lock()
		if r.revoked == nil {
			r.revoked = map[string]provider.Lease{}
		}
		r.revoked[l.ID] = l
		r.mu.Unlock()
	}
	return err
}

// crashRun is one run of a scenario: a node, a manager on a crashStore
// and the pod's volume.
type crashRun struct {
	*node
	cs  *crashstore.Store
	m   *Manager
	vol Volume
	ttl time.Duration
	// withdrawn: the volume must be found withdrawn.
	withdrawn bool
}

// crashScenario is one operation whose every write is a crash point.
type crashScenario struct {
	name  string
	setup func(t *testing.T, c *crashRun) // runs before writes are counted
	op    func(t *testing.T, c *crashRun)
	// running: the pod uses the volume before, during and after op.
	running bool
	// withdrawn: op withdraws the volume; from its first write on, the
	// volume must stay withdrawn (mounted, empty, holding no credential).
	withdrawn bool
	// tasks: the volume's class has a lease socket.
	tasks bool
	// retry is what kubelet does after the restart, as the op never
	// returned to it.
	retry func(t *testing.T, c *crashRun, m *Manager)
	// fault, if set, makes the op's first call of that kind to the
	// backend fail so: the writes of the failure path are crash points too.
	fault struct {
		call string
		kind faults.Kind
	}
}

// withFault returns sc, named for it, with the backend failing at call.
func withFault(sc crashScenario, call string, kind faults.Kind) crashScenario {
	sc.name += "/" + call + "-" + string(kind)
	sc.fault.call, sc.fault.kind = call, kind
	return sc
}

func publish(t *testing.T, m *Manager, v Volume) {
	t.Helper()
	if err := m.Publish(context.Background(), v); err != nil {
		t.Fatalf("publish: %v", err)
	}
}

func unpublish(t *testing.T, m *Manager, v Volume) {
	t.Helper()
	if err := m.Unpublish(context.Background(), v.ID, v.TargetPath); err != nil {
		t.Fatalf("unpublish: %v", err)
	}
}

var crashScenarios = []crashScenario{
	{
		name:  "publish",
		op:    func(t *testing.T, c *crashRun) { _ = c.m.Publish(context.Background(), c.vol) },
		retry: func(t *testing.T, c *crashRun, m *Manager) { publish(t, m, c.vol) },
	},
	{
		name:    "renew",
		running: true,
		setup: func(t *testing.T, c *crashRun) {
			publish(t, c.m, c.vol)
			// Half the TTL has gone by, as far as the backend's renewal is concerned.
			c.m.ageBy(c.vol.ID, c.ttl/2)
		},
		op:    func(t *testing.T, c *crashRun) { c.m.renewNow(c.vol.ID) },
		retry: func(t *testing.T, c *crashRun, m *Manager) { publish(t, m, c.vol) },
	},
	{
		// A fresh lease is not worth renewing: the provider says so and
		// the manager rotates.
		name:    "rotate",
		running: true,
		setup:   func(t *testing.T, c *crashRun) { publish(t, c.m, c.vol) },
		op:      func(t *testing.T, c *crashRun) { c.m.renewNow(c.vol.ID) },
		retry:   func(t *testing.T, c *crashRun, m *Manager) { publish(t, m, c.vol) },
	},
	{
		// The lease lapsed while its pod held it (as far as the manager
		// knows): the lapse is recorded, then the lease is replaced.
		name:    "rotate-after-lapse",
		running: true,
		setup: func(t *testing.T, c *crashRun) {
			publish(t, c.m, c.vol)
			c.m.expireIn(c.vol.ID, -time.Second)
		},
		op:    func(t *testing.T, c *crashRun) { c.m.renewNow(c.vol.ID) },
		retry: func(t *testing.T, c *crashRun, m *Manager) { publish(t, m, c.vol) },
	},
	{
		name:  "unpublish",
		setup: func(t *testing.T, c *crashRun) { publish(t, c.m, c.vol) },
		op: func(t *testing.T, c *crashRun) {
			_ = c.m.Unpublish(context.Background(), c.vol.ID, c.vol.TargetPath)
		},
		retry: func(t *testing.T, c *crashRun, m *Manager) { unpublish(t, m, c.vol) },
	},
	{
		name: "revoke",
		setup: func(t *testing.T, c *crashRun) {
			publish(t, c.m, c.vol)
			unpublish(t, c.m, c.vol)
		},
		op:    func(t *testing.T, c *crashRun) { c.m.drain(context.Background()) },
		retry: func(t *testing.T, c *crashRun, m *Manager) {},
	},
	{
		// The pod gives its credential back (or an admin kills it), and the
		// worker asks the backend.
		name:      "withdraw",
		withdrawn: true,
		setup:     func(t *testing.T, c *crashRun) { publish(t, c.m, c.vol) },
		op: func(t *testing.T, c *crashRun) {
			if _, err := c.m.Withdraw(context.Background(), c.vol.ID, "given back"); err != nil {
				t.Errorf("withdraw: %v", err)
			}
			c.m.drain(context.Background())
		},
		// Kubelet's periodic republish: OK, and nothing issued.
		retry: func(t *testing.T, c *crashRun, m *Manager) { publish(t, m, c.vol) },
	},
	{
		// The pod asks its socket for a task lease.
		name:    "task-issue",
		running: true,
		tasks:   true,
		setup:   func(t *testing.T, c *crashRun) { publish(t, c.m, c.vol) },
		op: func(t *testing.T, c *crashRun) {
			_, _ = c.m.IssueTask(context.Background(), c.vol.ID, "t1", 0)
		},
		// The pod never got an answer: it asks again.
		retry: func(t *testing.T, c *crashRun, m *Manager) {
			if _, err := m.IssueTask(context.Background(), c.vol.ID, "t1", 0); err != nil && !errors.Is(err, ErrTaskExists) {
				t.Errorf("task issue after the restart: %v", err)
			}
			checkTask(t, c, m, "t1")
		},
	},
	{
		// The pod gives a task lease back; the worker asks the backend.
		name:    "task-revoke",
		running: true,
		tasks:   true,
		setup: func(t *testing.T, c *crashRun) {
			publish(t, c.m, c.vol)
			if _, err := c.m.IssueTask(context.Background(), c.vol.ID, "t1", 0); err != nil {
				t.Fatal(err)
			}
		},
		op: func(t *testing.T, c *crashRun) {
			_, _ = c.m.RevokeTask(context.Background(), c.vol.ID, "t1")
			c.m.drain(context.Background())
		},
		retry: func(t *testing.T, c *crashRun, m *Manager) {
			if _, err := m.RevokeTask(context.Background(), c.vol.ID, "t1"); err != nil && !errors.Is(err, ErrUnknownTask) {
				t.Errorf("task revoke after the restart: %v", err)
			}
			m.drain(context.Background())
			if _, err := c.files.readDir(filepath.Join(c.vol.TargetPath, "tasks", "t1")); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("the revoked task's files are still there (%v)", err)
			}
		},
	},
}

// checkTask checks that task's lease is held, its files are there and log in.
func checkTask(t *testing.T, c *crashRun, m *Manager, task string) {
	t.Helper()
	info, err := m.Info(c.vol.ID)
	if err != nil {
		t.Fatal(err)
	}
	if len(info.Tasks) != 1 || info.Tasks[0].Task != task {
		t.Fatalf("tasks after the retry: %+v", info.Tasks)
	}
	if err := c.login(context.Background(), filepath.Join(c.vol.TargetPath, "tasks", task)); err != nil {
		t.Errorf("task %s's credential: %v", task, err)
	}
}

func init() {
	// The failure paths: an issue whose reply was lost (undone at publish,
	// abandoned at rotation) and a revocation the backend refused.
	byName := map[string]crashScenario{}
	for _, sc := range crashScenarios {
		byName[sc.name] = sc
	}
	crashScenarios = append(crashScenarios,
		withFault(byName["publish"], "Issue", faults.Lost),
		withFault(byName["rotate"], "Issue", faults.Lost),
		withFault(byName["revoke"], "Revoke", faults.Error),
		withFault(byName["withdraw"], "Revoke", faults.Error),
		withFault(byName["task-issue"], "Issue", faults.Lost),
		withFault(byName["task-revoke"], "Revoke", faults.Error),
	)
}

// TestCrashAtEveryWrite stops the manager right after each durable write
// of publish, renewal, rotation, unpublish and revocation, recovers a new
// manager from the store as it was left, and checks that no credential is
// alive without a record that revokes it, that a running pod keeps its
// mount and a valid credential, that nothing a pod uses is revoked, and
// that every lease record is revoked with all it holds.
//
// It runs in both tiers: the unprivileged one enumerates every point in
// memory against the fake backend, the privileged one against real tmpfs
// and PostgreSQL. Each prints how many points it went through (the guard
// in test/unprivileged checks the unprivileged tier's).
func TestCrashAtEveryWrite(t *testing.T) {
	const ttl = time.Hour
	for _, tr := range tiers {
		t.Run(tr.name, func(t *testing.T) {
			tr.newNode(t, ttl) // skips a tier that cannot run here
			total := 0
			for _, sc := range crashScenarios {
				for k := 1; ; k++ {
					done := false
					t.Run(fmt.Sprintf("%s/after-write-%d", sc.name, k), func(t *testing.T) {
						done = crashAt(t, sc, k, ttl, tr.newNode)
					})
					if done || k > 40 {
						total += k - 1
						t.Logf("%s: %d writes", sc.name, k-1)
						break
					}
				}
			}
			fmt.Printf("crash points enumerated (%s): %d\n", tr.name, total)
		})
	}
}

// crashAt runs sc with a crash after write k and checks recovery. It
// reports whether the operation finished in fewer than k writes (no crash).
func crashAt(t *testing.T, sc crashScenario, k int, ttl time.Duration, newNode func(testing.TB, time.Duration, ...string) *node) bool {
	ctx := context.Background()
	n := newNode(t, ttl)
	cs := crashstore.New(n.raw)
	fp := &faults.Provider{Provider: n.prov}
	c := &crashRun{node: n, cs: cs, m: n.manager(NewStore(cs), fp, Options{}), vol: n.volume(fmt.Sprintf("p%d", k)), ttl: ttl,
		withdrawn: sc.withdrawn}
	if sc.tasks {
		c.vol.Attributes[spc.ClassKey], c.vol.Mount.Class = "db-tasks", "db-tasks"
	}
	if err := c.m.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	if sc.setup != nil {
		sc.setup(t, c)
	}
	cs.Arm(k)
	if sc.fault.call != "" {
		fp.Inject(sc.fault.call, sc.fault.kind)
	}
	stopped := crashstore.Run(func() { sc.op(t, c) })
	c.m.Close()
	if stopped == "" {
		return true
	}
	t.Logf("stopped after write %d (%s)", k, stopped)

	// What the crash left: every lease record the store holds.
	records := map[string]provider.Lease{}
	ls, err := n.store.ListLeases(c.vol.ID)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range ls {
		records[l.ID] = l
	}
	rec := &revokeRecorder{Provider: n.prov}
	m := n.manager(n.store, rec, Options{})
	defer m.Close()
	if err := m.Recover(ctx); err != nil {
		t.Fatalf("recover: %v", err)
	}
	c.checkRecovered(t, m, sc.running, "after recovery")
	m.drain(ctx)
	if q, _ := n.store.ListRevocations(); len(q) > 0 {
		t.Errorf("%d revocations still queued with the backend up", len(q))
	}
	c.checkRecovered(t, m, sc.running, "after the queue drained")
	live := c.held(m)
	for id, l := range records {
		if live[n.credential(id)] {
			continue
		}
		got, ok := rec.revoked[id]
		if !ok {
			t.Errorf("lease %s was recorded, is not in use, and was never revoked", id)
		} else if !maps.Equal(got.Handle, l.Handle) {
			t.Errorf("lease %s was revoked without all its record holds (handle keys %v, recorded %v)",
				id, slices.Sorted(maps.Keys(got.Handle)), slices.Sorted(maps.Keys(l.Handle)))
		}
	}

	// Kubelet retries what never returned; then the pod goes away.
	sc.retry(t, c, m)
	c.checkRecovered(t, m, false, "after kubelet's retry")
	if m.Published(c.vol.ID) {
		unpublish(t, m, c.vol)
	}
	m.drain(ctx)
	if alive := n.alive(ctx); len(alive) > 0 {
		t.Errorf("credentials left alive after the pod went away: %v", slices.Sorted(maps.Keys(alive)))
	}
	if n.store.IsMounted(c.vol.TargetPath) {
		t.Error("target still mounted after the pod went away")
	}
	if ids, _ := n.store.ListVolumes(); len(ids) > 0 {
		t.Errorf("volumes left recorded: %v", ids)
	}
	return false
}

// held names the credential of every lease manager m holds for the
// run's volume: its own and its tasks' (none once withdrawn).
func (c *crashRun) held(m *Manager) map[string]bool {
	out := map[string]bool{}
	info, err := m.Info(c.vol.ID)
	if err != nil || info.State == string(StateWithdrawn) {
		return out
	}
	out[c.credential(info.LeaseID)] = true
	for _, task := range info.Tasks {
		out[c.credential(task.LeaseID)] = true
	}
	return out
}

// checkRecovered checks the invariants on what manager m holds now.
func (c *crashRun) checkRecovered(t *testing.T, m *Manager, running bool, when string) {
	t.Helper()
	ctx := context.Background()
	live := c.held(m)
	queued := map[string]bool{}
	q, err := c.store.ListRevocations()
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range q {
		queued[c.credential(r.Lease.ID)] = true
	}
	for role := range c.alive(ctx) {
		if !live[role] && !queued[role] {
			t.Errorf("%s: role %s is alive with no record that will revoke it", when, role)
		}
	}
	if running {
		if !m.Published(c.vol.ID) {
			t.Errorf("%s: the running pod's volume was dropped", when)
		}
		if !c.store.IsMounted(c.vol.TargetPath) {
			t.Errorf("%s: the running pod's target was unmounted", when)
		} else if err := c.login(ctx, c.vol.TargetPath); err != nil {
			t.Errorf("%s: the running pod's credential does not work: %v", when, err)
		}
	}
	if c.withdrawn && m.Published(c.vol.ID) {
		// Every write of a withdrawal comes after the one that records it.
		if info, err := m.Info(c.vol.ID); err != nil || info.State != string(StateWithdrawn) {
			t.Errorf("%s: the withdrawn volume is %s (%v)", when, info.State, err)
		}
		if !c.store.IsMounted(c.vol.TargetPath) {
			t.Errorf("%s: the withdrawn volume's target was unmounted", when)
		} else if entries, err := c.files.readDir(c.vol.TargetPath); err != nil || len(entries) > 0 {
			t.Errorf("%s: the withdrawn volume shows %d entries (%v)", when, len(entries), err)
		}
		return
	}
	// Whatever is mounted for a live volume holds a working credential.
	if m.Published(c.vol.ID) && c.store.IsMounted(c.vol.TargetPath) {
		if err := c.login(ctx, c.vol.TargetPath); err != nil {
			t.Errorf("%s: a mounted volume's credential does not work: %v", when, err)
		}
	}
}
