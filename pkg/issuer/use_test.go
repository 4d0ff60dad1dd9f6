package issuer

import (
	"context"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/credential"
	pgengine "github.com/ephemeral-secrets/csi-driver/pkg/issuer/postgres"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider/postgres"
	"github.com/ephemeral-secrets/csi-driver/test/harness"
)

// useInventory is the in-memory Inventory that is also a UseRecorder.
type useInventory struct {
	*inventory
	mu    sync.Mutex
	calls []string
	last  map[string]credential.Usage
}

var _ UseRecorder = (*useInventory)(nil)

func (v *useInventory) note(s string) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.calls = append(v.calls, s)
}

func (v *useInventory) Used(_ context.Context, e credential.Record, u credential.Usage) error {
	v.mu.Lock()
	v.last[e.LeaseID] = u
	v.mu.Unlock()
	v.note("used " + e.LeaseID)
	return nil
}

func (v *useInventory) UsedElsewhere(_ context.Context, e credential.Record, addr, action string) error {
	v.note("elsewhere " + e.LeaseID + " " + addr + " " + action)
	return nil
}

func (v *useInventory) Withdraw(ctx context.Context, e credential.Record) error {
	v.note("withdraw " + e.LeaseID)
	return v.Dropped(ctx, e.LeaseID) // the record goes, as the kill switch's deletion
}

func (v *useInventory) saw(s string) bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	return slices.Contains(v.calls, s)
}

// The cluster issuer's Run observes use through an Inventory that is a
// UseRecorder: a login from an address the connection does not list (no
// expectedSources here: 127.0.0.1 is foreign) with onForeignUse revoke
// warns the pod, withdraws the record, ends the session and drops the
// role; the record hears the summary.
func TestRunObservesUseThroughTheInventory(t *testing.T) {
	ctx := context.Background()
	inv := &useInventory{inventory: newInventory(), last: map[string]credential.Usage{}}
	iss, _ := newIssuer(t, Options{Inventory: inv, Use: UseOptions{Interval: 100 * time.Millisecond},
		Config: config(map[string]*pgengine.Role{"app": {CreationStatements: []string{create}, OnForeignUse: "revoke",
			Allowed: []pgengine.Subject{{Namespace: "team", ServiceAccount: "app"}}}})})
	rctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { defer close(done); iss.Run(rctx) }()
	defer func() { cancel(); <-done }()

	node := postgres.NewNode(iss.Local())
	l, err := issue(ctx, node, "team-u-observed1", appPod("u"))
	if err != nil {
		t.Fatal(err)
	}
	conn, err := login(ctx, l)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	harness.Eventually(t, 10*time.Second, "the kill", func() (bool, error) {
		return inv.saw("withdraw team-u-observed1") && !exists(t, l.Values["username"]), nil
	})
	if !inv.saw("elsewhere team-u-observed1 127.0.0.1 revoke") {
		t.Errorf("the pod was not warned: %v", inv.calls)
	}
	if _, err := conn.Exec(ctx, `SELECT 1`); err == nil {
		t.Error("the session outlives the kill")
	}
	harness.Eventually(t, 10*time.Second, "the summary", func() (bool, error) {
		_, live := iss.Usage("team-u-observed1")
		inv.mu.Lock()
		defer inv.mu.Unlock()
		u, used := inv.last["team-u-observed1"], 0
		for _, c := range inv.calls {
			if c == "used team-u-observed1" {
				used++
			}
		}
		return !live && used == 2 && u.Sessions == 1 && len(u.Sources) == 1 && strings.HasPrefix(u.Sources[0].Address, "127.0.0.1"), nil
	})
}
