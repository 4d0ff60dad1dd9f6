package lease_test

import (
	"context"
	"testing"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/lease"
	"github.com/ephemeral-secrets/csi-driver/test/crashstore"
)

// A publish that a crash stopped after its lease was recorded is revoked
// with everything the record holds: for Vault, the login token (which
// takes the database role it read with it). Before, recovery queued the
// lease by ID alone, Vault could not revoke that, and the record with the
// token was deleted.
func TestCrashedVaultPublishRevokesItsToken(t *testing.T) {
	e := newVaultEnv(t, time.Hour, 2*time.Hour)
	ctx := context.Background()
	tokensChecked := 0
	for k := 1; k < 20; k++ {
		cs := crashstore.New(e.fs)
		m := e.restart(lease.Options{Store: lease.NewStore(cs)})
		cs.Arm(k)
		after := crashstore.Run(func() { _ = m.Publish(ctx, e.vol) })
		m.Close()
		if after == "" {
			// Published without a crash: the end of the enumeration.
			e.unpublishAndDrain(e.restart(lease.Options{}))
			break
		}
		records, err := e.store.ListLeases(e.vol.ID)
		if err != nil {
			t.Fatal(err)
		}
		m2 := e.restart(lease.Options{})
		// The publish finished before the crash if recovery resumed the
		// volume: its lease must live on, and die at unpublish.
		resumed, _ := e.store.ReadLease(e.vol.ID)
		drain(t, m2)
		for _, l := range records {
			if l.ID == resumed.ID {
				if !e.tokenAlive(l) {
					t.Errorf("after write %d (%s): the resumed volume's token was revoked", k, after)
				}
				continue
			}
			tokensChecked++
			if e.tokenAlive(l) {
				t.Errorf("after write %d (%s): the recorded Vault token is still alive after recovery", k, after)
			}
		}
		if resumed.ID != "" {
			e.unpublishAndDrain(e.restart(lease.Options{}))
			if e.tokenAlive(resumed) {
				t.Errorf("after write %d (%s): the token outlived the unpublish", k, after)
			}
		}
	}
	if tokensChecked == 0 {
		t.Fatal("no crash point left a recorded token: the test checks nothing")
	}
}
