package lease_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/audit"
	"github.com/ephemeral-secrets/csi-driver/pkg/lease"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/test/faults"
)

func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	for end := time.Now().Add(timeout); !cond(); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatalf("timed out waiting until %s", what)
		}
	}
}

// TestVaultFailsAtEachCall makes each call to a real Vault (Issue at
// publish, Renew, Revoke) fail refused, timed out, and done with the
// reply lost, and checks what the pod and the backend are left with.
func TestVaultFailsAtEachCall(t *testing.T) {
	e := newVaultEnv(t, 6*time.Second, time.Minute)
	ctx := context.Background()
	opts := func(tr *lease.AuditTrail) lease.Options {
		return lease.Options{Audit: audit.New(tr), BackendTimeout: time.Second,
			RetryMin: 100 * time.Millisecond, RetryMax: 500 * time.Millisecond}
	}
	for _, kind := range faults.Kinds {
		t.Run("publish/Issue/"+string(kind), func(t *testing.T) {
			tr := &lease.AuditTrail{}
			before := e.appTokens()
			m := e.restart(opts(tr))
			e.fp.Inject("Issue", kind)
			if err := m.Publish(ctx, e.vol); !errors.Is(err, provider.ErrUnavailable) {
				t.Fatalf("publish: %v, want ErrUnavailable", err)
			}
			if ids, _ := e.store.ListVolumes(); len(ids) > 0 {
				t.Fatalf("a failed publish left volumes %v", ids)
			}
			drain(t, m)
			leaked := e.appTokens() - before
			switch {
			case kind == faults.Lost:
				// Vault logged the pod in and the driver never heard the
				// token: it cannot revoke it, and says so; the token's TTL
				// ends it.
				if leaked != 1 || tr.Count(t, audit.Revoke, audit.Unrevocable) != 1 {
					t.Errorf("lost reply: %d tokens left, %d unrevocable records; want 1 and 1", leaked, tr.Count(t, audit.Revoke, audit.Unrevocable))
				}
			case leaked != 0:
				t.Errorf("%d tokens left by a publish that failed before Vault acted", leaked)
			}
			// Kubelet retries; then the pod goes away.
			m = e.restart(opts(tr))
			if err := m.Publish(ctx, e.vol); err != nil {
				t.Fatal(err)
			}
			if err := e.login(); err != nil {
				t.Fatalf("the retried publish's credential: %v", err)
			}
			l, _ := e.store.ReadLease(e.vol.ID)
			e.unpublishAndDrain(m)
			if e.tokenAlive(l) {
				t.Error("the token outlived the unpublish")
			}
		})
		t.Run("renewal/Renew/"+string(kind), func(t *testing.T) {
			tr := &lease.AuditTrail{}
			m := e.restart(opts(tr))
			if err := m.Publish(ctx, e.vol); err != nil {
				t.Fatal(err)
			}
			e.fp.Inject("Renew", kind)
			rctx, cancel := context.WithCancel(ctx)
			defer cancel()
			go m.Run(rctx)
			waitFor(t, 10*time.Second, "the renewal fails", func() bool { return !e.fp.Armed() })
			waitFor(t, 10*time.Second, "a renewal succeeds after it", func() bool {
				return tr.Count(t, audit.Renew, audit.Success) > 0
			})
			if err := e.login(); err != nil {
				t.Errorf("the pod's credential after the failed renewal: %v", err)
			}
			if n := tr.Count(t, audit.Expire, ""); n != 0 {
				t.Errorf("%d expire records: the lease lapsed", n)
			}
			l, _ := e.store.ReadLease(e.vol.ID)
			cancel()
			e.unpublishAndDrain(m)
			if e.tokenAlive(l) {
				t.Error("the token outlived the unpublish")
			}
		})
		t.Run("revocation/Revoke/"+string(kind), func(t *testing.T) {
			tr := &lease.AuditTrail{}
			m := e.restart(opts(tr))
			if err := m.Publish(ctx, e.vol); err != nil {
				t.Fatal(err)
			}
			l, _ := e.store.ReadLease(e.vol.ID)
			e.fp.Inject("Revoke", kind)
			e.unpublishAndDrain(m) // waits for the retry
			if e.fp.Armed() {
				t.Fatal("Revoke was never called")
			}
			if tr.Count(t, audit.Failure, audit.Error) == 0 {
				t.Error("the failed revocation left no failure record")
			}
			if e.tokenAlive(l) {
				t.Error("the token survived a retried revocation")
			}
		})
	}
}
