package inventory_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"

	v1alpha1 "github.com/ephemeral-secrets/csi-driver/pkg/apis/ephemeralsecrets/v1alpha1"
	"github.com/ephemeral-secrets/csi-driver/pkg/credential"
	"github.com/ephemeral-secrets/csi-driver/pkg/inventory"
	"github.com/ephemeral-secrets/csi-driver/pkg/issuer"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider/postgres"
	"github.com/ephemeral-secrets/csi-driver/test/harness"
)

// requests notes the requests of a client: "METHOD path".
type requests struct {
	mu  sync.Mutex
	log []string
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// writes is the requests noted that write (every method but GET).
func (r *requests) writes() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for _, l := range r.log {
		if !strings.HasPrefix(l, "GET ") {
			out = append(out, l)
		}
	}
	return out
}

// countingClient is an inventory client with the issuer's identity whose
// requests are noted.
func countingClient(t *testing.T) (*inventory.Client, *requests) {
	t.Helper()
	rq := &requests{}
	cfg := rest.CopyConfig(issuerCfg)
	cfg.Wrap(func(rt http.RoundTripper) http.RoundTripper {
		return roundTripFunc(func(r *http.Request) (*http.Response, error) {
			rq.mu.Lock()
			rq.log = append(rq.log, r.Method+" "+r.URL.Path)
			rq.mu.Unlock()
			return rt.RoundTrip(r)
		})
	})
	c, err := inventory.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return c, rq
}

// laggingClient is an inventory client with the issuer's identity whose
// watches deliver each read lag late.
func laggingClient(t *testing.T, lag time.Duration) *inventory.Client {
	t.Helper()
	cfg := rest.CopyConfig(issuerCfg)
	cfg.Wrap(func(rt http.RoundTripper) http.RoundTripper {
		return roundTripFunc(func(r *http.Request) (*http.Response, error) {
			resp, err := rt.RoundTrip(r)
			if err == nil && r.URL.Query().Get("watch") == "true" {
				resp.Body = slowBody{resp.Body, lag}
			}
			return resp, err
		})
	})
	c, err := inventory.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

type slowBody struct {
	io.ReadCloser
	lag time.Duration
}

func (b slowBody) Read(p []byte) (int, error) {
	time.Sleep(b.lag)
	return b.ReadCloser.Read(p)
}

// statusHeld is the Recorder as the Issuer's Inventory, its status
// writes (Issued) held until release is closed: the mint's answer must
// not wait for them. Lost, they are never made (the issuer died first).
type statusHeld struct {
	*inventory.Recorder
	release chan struct{}
	lost    bool
}

func (s statusHeld) Issued(ctx context.Context, e credential.Record) error {
	if s.lost {
		return nil
	}
	select {
	case <-s.release:
		return s.Recorder.Issued(ctx, e)
	case <-ctx.Done():
		return ctx.Err()
	}
}

// TestAMintWritesOnceOnItsPath: a mint through the issuer writes its
// record once before it answers (the create, whole: lease, pod, volume,
// the issuer's finalizer), reads the volume's tombstone, and answers
// while its status write is held; the status (issued, the role's name,
// until when) follows: two writes in all.
func TestAMintWritesOnceOnItsPath(t *testing.T) {
	ctx := context.Background()
	ns := namespace(t)
	pod := newPod(t, ns, "app")
	c, rq := countingClient(t)
	held := statusHeld{Recorder: inventory.NewRecorder(c, nil), release: make(chan struct{})}
	p, _, _ := startRealIssuerWith(t, ns, ns+"-a", realIssuer{recorder: held.Recorder,
		wrap: func(*inventory.Recorder) issuer.Inventory { return held }})
	l, err := publish(ctx, p, pod, ns+"-app-onewrite1", "csi-vol-a")
	if err != nil {
		t.Fatal(err)
	}
	harness.RememberSecret(l.Values["password"])
	if w := rq.writes(); len(w) != 1 || !strings.HasPrefix(w[0], "POST ") || !strings.HasSuffix(w[0], "/credentials") {
		t.Errorf("writes before the answer: %q, want the record's create alone", w)
	}
	cr := get(t, ns, l.ID)
	if !slices.Equal(cr.Finalizers, []string{v1alpha1.FinalizerRevoke}) || cr.Spec.LeaseID != l.ID ||
		cr.Spec.VolumeID != "csi-vol-a" || cr.Spec.Pod.UID != string(pod.UID) || cr.Spec.Role != "main/app" || cr.Status.State != "" {
		t.Errorf("the record before its status: finalizers %v, spec %+v, status %+v", cr.Finalizers, cr.Spec, cr.Status)
	}
	if !roleExists(t, l.Values["username"]) {
		t.Fatal("no role")
	}
	close(held.release)
	harness.Eventually(t, 10*time.Second, "the status written after the answer", func() (bool, error) {
		cr, err := adminInv.Get(ctx, ns, inventory.Name(l.ID))
		return err == nil && cr.Status.State == v1alpha1.StateIssued && cr.Status.ExpiresAt != nil &&
			cr.Status.ExpiresAt.Time.Equal(l.ExpiresAt) && cr.Status.BackendName == l.Values["username"], err
	})
	if w := rq.writes(); len(w) != 2 || !strings.HasSuffix(w[1], "/status") {
		t.Errorf("writes in all: %q, want the create and one status", w)
	}
}

// TestCrashBetweenTheRecordAndTheRole: the issuer wrote a mint's record
// and died before the role. The record holds no role; the reaper drops
// nothing; its deletion (the kill switch) revokes nothing that is there,
// leaves the volume's tombstone, and the volume is refused a new
// credential.
func TestCrashBetweenTheRecordAndTheRole(t *testing.T) {
	ctx := context.Background()
	ns := namespace(t)
	pod := newPod(t, ns, "app")
	p, iss, rec := startRealIssuerWith(t, ns, ns+"-a", realIssuer{})
	lease := ns + "-app-crashrec1"
	e := credential.Record{LeaseID: lease, VolumeID: "csi-vol-a", Node: ns + "-a", Class: ns + "/db", Provider: postgres.Name,
		Pod:  provider.Pod{Namespace: ns, Name: pod.Name, UID: string(pod.UID), ServiceAccount: "default"},
		Role: "main/app", Name: postgres.RoleName(lease)}
	if err := rec.Issuing(ctx, e); err != nil { // the mint's one write; then the crash
		t.Fatal(err)
	}
	if rep, err := iss.Reap(ctx); err != nil || rep.Dropped() != 0 {
		t.Errorf("reap: %+v, %v", rep, err)
	}
	if err := adminInv.Delete(ctx, ns, inventory.Name(lease), metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	gone(t, ns, inventory.Name(lease))
	if _, err := adminInv.Get(ctx, ns, inventory.TombstoneName(string(pod.UID), "csi-vol-a")); err != nil {
		t.Fatalf("no tombstone: %v", err)
	}
	if _, err := publish(ctx, p, pod, ns+"-app-crashrec2", "csi-vol-a"); !errors.Is(err, issuer.ErrWithdrawn) {
		t.Errorf("a new credential for the killed volume: %v, want withdrawn", err)
	}
	if roleExists(t, postgres.RoleName(lease)) || roleExists(t, postgres.RoleName(ns+"-app-crashrec2")) {
		t.Error("a role was made")
	}
}

// recordHangs is the Recorder as the Issuer's Inventory whose record
// writes never end (until the mint's context does): the issuer died as
// it wrote the record, after its role was made.
type recordHangs struct{ *inventory.Recorder }

func (r recordHangs) Issuing(ctx context.Context, _ credential.Record) error {
	<-ctx.Done()
	return ctx.Err()
}

// TestCrashBetweenTheRoleAndTheRecord: a mint makes its record and its
// role at once; the issuer made the role and died before the record was
// written. The role has no record: the reaper leaves it while it is
// younger than UntrackedGrace (its record may be on its way) and drops it
// after, its sessions with it.
func TestCrashBetweenTheRoleAndTheRecord(t *testing.T) {
	ctx := context.Background()
	ns := namespace(t)
	pod := newPod(t, ns, "app")
	var mu sync.Mutex
	offset := time.Duration(0)
	now := func() time.Time { mu.Lock(); defer mu.Unlock(); return time.Now().Add(offset) }
	p, iss, _ := startRealIssuerWith(t, ns, ns+"-a", realIssuer{now: now, grace: 10 * time.Second,
		wrap: func(r *inventory.Recorder) issuer.Inventory { return recordHangs{r} }})
	lease := ns + "-app-crashrole1"
	mctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() {
		_, err := publish(mctx, p, pod, lease, "csi-vol-a")
		done <- err
	}()
	t.Cleanup(func() { cancel(); <-done })
	harness.Eventually(t, 10*time.Second, "the role, made as its record is written", func() (bool, error) {
		return roleExists(t, postgres.RoleName(lease)), nil
	})
	if _, err := adminInv.Get(ctx, ns, inventory.Name(lease)); !apierrors.IsNotFound(err) {
		t.Fatalf("the record: %v, want none", err)
	}
	if rep, err := iss.Reap(ctx); err != nil || rep.Dropped() != 0 || !roleExists(t, postgres.RoleName(lease)) {
		t.Fatalf("reap within the grace: %+v, %v: the role's record may be on its way", rep, err)
	}
	mu.Lock()
	offset = 20 * time.Second
	mu.Unlock()
	if rep, err := iss.Reap(ctx); err != nil || rep.Untracked != 1 || roleExists(t, postgres.RoleName(lease)) {
		t.Fatalf("reap after the grace: %+v, %v: want the untracked role dropped", rep, err)
	}
}

// TestCrashBetweenTheRoleAndItsStatus: the issuer made the role and died
// before the record's status was written. The record, as created, holds
// the role: the reaper leaves it; its deletion (the kill switch) drops it
// by the lease's name alone.
func TestCrashBetweenTheRoleAndItsStatus(t *testing.T) {
	ctx := context.Background()
	ns := namespace(t)
	pod := newPod(t, ns, "app")
	p, iss, _ := startRealIssuerWith(t, ns, ns+"-a", realIssuer{
		wrap: func(r *inventory.Recorder) issuer.Inventory { return statusHeld{Recorder: r, lost: true} }})
	l, err := publish(ctx, p, pod, ns+"-app-crashrol1", "csi-vol-a")
	if err != nil {
		t.Fatal(err)
	}
	harness.RememberSecret(l.Values["password"])
	if cr := get(t, ns, l.ID); cr.Status.State != "" || cr.Status.BackendName != "" {
		t.Fatalf("status %+v, want none", cr.Status)
	}
	if rep, err := iss.Reap(ctx); err != nil || rep.Dropped() != 0 || !roleExists(t, l.Values["username"]) {
		t.Fatalf("reap: %+v, %v: the record holds the role", rep, err)
	}
	if err := adminInv.Delete(ctx, ns, inventory.Name(l.ID), metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	gone(t, ns, inventory.Name(l.ID))
	if roleExists(t, l.Values["username"]) {
		t.Error("the killed record's role lives")
	}
}

// TestKillDuringTheMint: the record is deleted while its role is being
// made (the creation statements sleep): its revocation runs before the
// role exists. Whether the mint answered (its tombstone read came first)
// or was refused, no role is left, and the volume is refused a new
// credential.
func TestKillDuringTheMint(t *testing.T) {
	ctx := context.Background()
	ns := namespace(t)
	pod := newPod(t, ns, "app")
	p, _, _ := startRealIssuerWith(t, ns, ns+"-a", realIssuer{creation: []string{
		`CREATE ROLE "{{.Name}}" LOGIN PASSWORD '{{.Password}}' VALID UNTIL '{{.Expiration}}'`,
		`SELECT pg_sleep(2) WHERE '{{.Name}}' <> ''`,
	}})
	lease := ns + "-app-killmint1"
	type result struct {
		l   provider.Lease
		err error
	}
	done := make(chan result, 1)
	go func() {
		l, err := publish(ctx, p, pod, lease, "csi-vol-a")
		done <- result{l, err}
	}()
	harness.Eventually(t, 10*time.Second, "the mint's record", func() (bool, error) {
		_, err := adminInv.Get(ctx, ns, inventory.Name(lease))
		return err == nil, nil
	})
	if err := adminInv.Delete(ctx, ns, inventory.Name(lease), metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	gone(t, ns, inventory.Name(lease))
	r := <-done
	if r.err == nil {
		harness.RememberSecret(r.l.Values["password"])
	}
	t.Logf("the mint answered: %v", r.err)
	harness.Eventually(t, 10*time.Second, "no role for the killed record", func() (bool, error) {
		return !roleExists(t, postgres.RoleName(lease)), nil
	})
	if _, err := publish(ctx, p, pod, ns+"-app-killmint2", "csi-vol-a"); !errors.Is(err, issuer.ErrWithdrawn) {
		t.Errorf("a new credential for the killed volume: %v, want withdrawn", err)
	}
}

// TestWithdrawnKnowsATombstoneWrittenJustBefore: a tombstone written an
// instant before a mint's record (as the kill of another record of the
// volume writes it) refuses the mint, every time; the Recorder answers
// from its informer's cache once the cache holds the mint's record,
// without a request of its own.
func TestWithdrawnKnowsATombstoneWrittenJustBefore(t *testing.T) {
	ctx := context.Background()
	ns := namespace(t)
	pod := newPod(t, ns, "app")
	icx, cancel := context.WithCancel(ctx)
	// The cache lags behind the API server (its watch reads slowly), as a
	// busy issuer's does: a cache read too early misses the tombstone.
	inf := inventory.NewInformer(laggingClient(t, 50*time.Millisecond), "", 0)
	done := make(chan struct{})
	go func() { inf.Run(icx.Done()); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	harness.Eventually(t, 10*time.Second, "the cache synced", func() (bool, error) { return inf.HasSynced(), nil })
	c, rq := countingClient(t)
	rec := inventory.NewRecorder(c, inf)
	var made []string // records and tombstones, removed at the end: every later test's controller would look at each
	t.Cleanup(func() {
		for _, name := range made {
			if strings.HasPrefix(name, v1alpha1.TombstonePrefix) {
				_ = issuerInv.Delete(ctx, ns, name, metav1.DeleteOptions{})
			} else if err := inventory.NewRecorder(issuerInv, nil).Dropped(ctx, name); err != nil {
				t.Error(err)
			}
		}
	})
	for i := range 10 {
		vol, other := fmt.Sprintf("csi-killed-%d", i), fmt.Sprintf("csi-other-%d", i)
		tomb := &v1alpha1.Credential{
			ObjectMeta: metav1.ObjectMeta{Name: inventory.TombstoneName(string(pod.UID), vol), Namespace: ns,
				OwnerReferences: []metav1.OwnerReference{{APIVersion: "v1", Kind: "Pod", Name: pod.Name, UID: pod.UID}}},
			Spec: v1alpha1.CredentialSpec{Pod: v1alpha1.PodReference{Name: pod.Name, UID: string(pod.UID)}, Node: ns + "-a",
				Provider: "postgres", LeaseID: fmt.Sprintf("%s-app-killed%03d", ns, i), VolumeID: vol},
		}
		if _, err := issuerInv.Create(ctx, tomb); err != nil {
			t.Fatal(err)
		}
		made = append(made, tomb.Name)
		for _, tc := range []struct {
			vol  string
			want bool
		}{{vol, true}, {other, false}} {
			e := entryFor(pod, ns+"-a", fmt.Sprintf("%s-%d-%s", ns, i, tc.vol))
			e.VolumeID = tc.vol
			if err := rec.Issuing(ctx, e); err != nil {
				t.Fatal(err)
			}
			made = append(made, e.LeaseID)
			if got, err := rec.Withdrawn(ctx, e); err != nil || got != tc.want {
				t.Fatalf("round %d, volume %s: withdrawn %v, %v; want %v", i, tc.vol, got, err, tc.want)
			}
		}
	}
	rq.mu.Lock()
	defer rq.mu.Unlock()
	for _, l := range rq.log {
		if strings.HasPrefix(l, "GET ") {
			t.Errorf("the Recorder asked the API server: %s", l)
		}
	}
}
