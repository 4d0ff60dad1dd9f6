package lease

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/credential"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/spc"
)

// recordLog is a Records that remembers its calls and fails as told: the
// tests' stand-in for the cluster's inventory (pkg/inventory, tested
// against a real API server in test/cluster).
type recordLog struct {
	mu    sync.Mutex
	calls []string        // "issued <lease> <expiry>" or "revoked <lease>"
	fail  int             // calls left to fail
	gone  map[string]bool // lease IDs whose record is being deleted
}

func (r *recordLog) call(s string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.fail > 0 {
		r.fail--
		return errors.New("the API server is down")
	}
	r.calls = append(r.calls, s)
	return nil
}

func (r *recordLog) Issued(_ context.Context, rec credential.Record) error {
	r.mu.Lock()
	gone := r.gone[rec.LeaseID]
	r.mu.Unlock()
	if gone {
		return fmt.Errorf("%w: being deleted", credential.ErrRecordGone)
	}
	if rec.Pod.UID == "" || rec.VolumeID == "" || rec.Class == "" || rec.Provider == "" || rec.Role == "" {
		return fmt.Errorf("record %+v lacks what the inventory needs", rec)
	}
	s := fmt.Sprintf("issued %s %s", rec.LeaseID, rec.ExpiresAt.UTC().Format(time.RFC3339Nano))
	if rec.Task != "" {
		s += " task " + rec.Task
	}
	return r.call(s)
}

func (r *recordLog) Revoked(_ context.Context, rec credential.Record) error {
	return r.call("revoked " + rec.LeaseID)
}

func (r *recordLog) log() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.calls...)
}

func (r *recordLog) want(t *testing.T, when string, want ...string) {
	t.Helper()
	got := r.log()
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("%s: calls\n%q\nwant\n%q", when, got, want)
	}
}

func issuedCall(m *Manager, volumeID string) string {
	l := m.currentLease(volumeID)
	return fmt.Sprintf("issued %s %s", l.ID, l.ExpiresAt.UTC().Format(time.RFC3339Nano))
}

// The record follows the lease: issued at publish, again at each renewal
// or rotation with its new expiry, released once the backend confirmed
// the revocation (of a rotated-out lease too).
func TestRecordsFollowTheLease(t *testing.T) { inTiers(t, time.Hour, testRecordsFollowTheLease) }

func testRecordsFollowTheLease(t *testing.T, n *node) {
	ctx := context.Background()
	rl := &recordLog{}
	m := n.manager(n.store, n.prov, Options{Records: rl, Clock: n.clk})
	defer m.Close()
	if err := m.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	v := n.volume("r1")
	publish(t, m, v)
	first := issuedCall(m, v.ID)
	m.drainRecords(ctx)
	rl.want(t, "after publish", first)

	leaseOf := func() string { return m.currentLease(v.ID).ID }
	old := leaseOf()
	// The ledger's expiry has a second's resolution, as VALID UNTIL has:
	// two seconds on, a renewal moves it. (PostgreSQL's clock did not
	// move: its role is rotated instead.)
	n.clk.Step(2 * time.Second)
	m.renewNow(v.ID)
	renewed := issuedCall(m, v.ID)
	if renewed == first {
		t.Fatalf("the renewal did not move the expiry: %s", renewed)
	}
	m.drain(ctx) // a rotated-out lease's revocation
	m.drainRecords(ctx)
	want := []string{first, renewed}
	id := leaseOf()
	if id != old {
		want = append(want, "revoked "+old)
	}
	rl.want(t, "after a renewal", want...)

	unpublish(t, m, v)
	m.drainRecords(ctx)
	rl.want(t, "before the backend confirmed", want...)
	m.drain(ctx)
	if n.alive(ctx)[n.credential(id)] {
		t.Fatal("credential alive after the drain")
	}
	m.drainRecords(ctx)
	rl.want(t, "after the revocation", append(want, "revoked "+id)...)
}

// A failing inventory fails no publish and holds no revocation back: the
// calls are retried until they land, and a lease revoked meanwhile is
// released, not recorded again.
func TestRecordsFailureNeverBlocks(t *testing.T) {
	inTiers(t, time.Hour, testRecordsFailureNeverBlocks)
}

func testRecordsFailureNeverBlocks(t *testing.T, n *node) {
	ctx := context.Background()
	rl := &recordLog{fail: 1000}
	m := n.manager(n.store, n.prov, Options{Records: rl, RetryMin: time.Millisecond, RetryMax: time.Millisecond, Clock: n.clk})
	defer m.Close()
	if err := m.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	v, w := n.volume("f1"), n.volume("f2")
	publish(t, m, v)
	publish(t, m, w)
	if err := n.login(ctx, v.TargetPath); err != nil {
		t.Fatal(err)
	}
	m.drainRecords(ctx)
	vid := m.currentLease(v.ID).ID
	wIssued := issuedCall(m, w.ID)
	unpublish(t, m, v)
	m.drain(ctx)
	if n.alive(ctx)[n.credential(vid)] {
		t.Fatal("the revocation waited for the inventory")
	}
	if m.QueueLength() != 0 {
		t.Fatalf("%d revocations still queued", m.QueueLength())
	}
	rl.want(t, "while the inventory fails")

	rl.mu.Lock()
	rl.fail = 0
	rl.mu.Unlock()
	n.clk.Step(5 * time.Millisecond) // past the retry's backoff
	m.drainRecords(ctx)
	got := rl.log()
	want := map[string]bool{wIssued: true, "revoked " + vid: true}
	if len(got) != 2 || !want[got[0]] || !want[got[1]] {
		t.Fatalf("after the inventory is back: %q, want %v", got, want)
	}
}

// A record deleted as the node writes it (the kill switch raced the
// publish) withdraws the volume: files gone, credential revoked, record
// released.
func TestRecordGoneWithdraws(t *testing.T) { inTiers(t, time.Hour, testRecordGoneWithdraws) }

func testRecordGoneWithdraws(t *testing.T, n *node) {
	ctx := context.Background()
	rl := &recordLog{gone: map[string]bool{}}
	m := n.manager(n.store, n.prov, Options{Records: rl, Clock: n.clk})
	defer m.Close()
	if err := m.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	v := n.volume("g1")
	publish(t, m, v)
	id := m.currentLease(v.ID).ID
	rl.mu.Lock()
	rl.gone[id] = true
	rl.mu.Unlock()
	m.drainRecords(ctx) // the withdrawal runs in a goroutine of its own
	eventually(t, 10*time.Second, "the volume is withdrawn", func() bool {
		info, err := m.Info(v.ID)
		return err == nil && info.State == string(StateWithdrawn)
	})
	// Info says withdrawn from the withdrawal's first write on; the rest
	// of it is done once its volume's lock is free.
	m.waitFor(ctx, v.ID)
	checkWithdrawn(t, n, m, v, "after the record went")
	m.drainRecords(ctx)
	rl.want(t, "after the withdrawal", "revoked "+id)
}

// A task lease is recorded with its task and its end, and released when
// its revocation is confirmed; a restart records the live leases again
// (a record a crash kept from being written is created then).
func TestRecordsOfTasksAndAfterARestart(t *testing.T) {
	inTiers(t, time.Hour, testRecordsOfTasksAndAfterARestart)
}

func testRecordsOfTasksAndAfterARestart(t *testing.T, n *node) {
	ctx := context.Background()
	rl := &recordLog{}
	m := n.manager(n.store, n.prov, Options{Records: rl, Clock: n.clk})
	if err := m.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	v := n.volume("tr1")
	v.Attributes[spc.ClassKey], v.Mount.Class = "db-tasks", "db-tasks"
	publish(t, m, v)
	own := issuedCall(m, v.ID)
	task, err := m.IssueTask(ctx, v.ID, "a", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	taskCall := fmt.Sprintf("issued %s %s task a", task.LeaseID, task.ExpiresAt.UTC().Format(time.RFC3339Nano))
	m.drainRecords(ctx)
	rl.want(t, "after a task's issue", own, taskCall)

	// A restart: a new manager on the same state, its inventory empty.
	m.Close()
	rl2 := &recordLog{}
	m2 := n.manager(n.store, n.prov, Options{Records: rl2, Clock: n.clk})
	defer m2.Close()
	if err := m2.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	m2.drainRecords(ctx)
	got := rl2.log()
	if len(got) != 2 || !slices.Contains(got, own) || !slices.Contains(got, taskCall) {
		t.Fatalf("after a restart: %q, want %q and %q", got, own, taskCall)
	}

	done, err := m2.RevokeTask(ctx, v.ID, "a")
	if err != nil {
		t.Fatal(err)
	}
	m2.drain(ctx)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	m2.drainRecords(ctx)
	rl2.want(t, "after the task's end", append(got, "revoked "+task.LeaseID)...)
}

// unrevocable is a backend that cannot revoke (as AWS STS): its
// credentials live until they expire.
type unrevocable struct{ provider.Provider }

func (unrevocable) Revoke(context.Context, provider.Lease) error {
	return fmt.Errorf("%w: as an STS session", provider.ErrNotRevocable)
}

// A credential the backend cannot revoke keeps its record until it
// expires: the inventory shows what is alive.
func TestRecordOfAnUnrevocableCredentialGoesAtItsExpiry(t *testing.T) {
	inTiers(t, 5*time.Second, testRecordOfAnUnrevocableCredentialGoesAtItsExpiry)
}

func testRecordOfAnUnrevocableCredentialGoesAtItsExpiry(t *testing.T, n *node) {
	ctx := context.Background()
	rl := &recordLog{}
	m := n.manager(n.store, unrevocable{n.prov}, Options{Records: rl, Clock: n.clk})
	defer m.Close()
	if err := m.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	v := n.volume("u1")
	publish(t, m, v)
	first := issuedCall(m, v.ID)
	m.drainRecords(ctx)
	l := m.currentLease(v.ID)
	unpublish(t, m, v)
	m.drain(ctx)
	if m.QueueLength() != 0 {
		t.Fatal("the unrevocable credential's revocation stays queued")
	}
	left := l.ExpiresAt.Sub(n.clk.Now())
	if wait := m.drainRecords(ctx); wait <= 0 || wait > left+time.Second {
		t.Fatalf("next record call in %v, want at the expiry (%v)", wait, left)
	}
	rl.want(t, "before the expiry", first)
	n.clk.Step(left + 10*time.Millisecond)
	m.drainRecords(ctx)
	rl.want(t, "after the expiry", first, "revoked "+l.ID)
}
