package issuer

import (
	"context"
	"testing"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/credential"
	pgengine "github.com/ephemeral-secrets/csi-driver/pkg/issuer/postgres"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider/postgres"
)

// The reaper drops a tagged role whose VALID UNTIL passed and ends the
// session held open with it; it never touches a role without its tag, nor
// a tagged one still valid.
func TestReapDropsExpiredTaggedRolesOnly(t *testing.T) {
	ctx := context.Background()
	iss, _ := newIssuer(t, Options{})
	node := postgres.NewNode(iss.Local())
	expired, err := issue(ctx, node, "team-e-expired01", appPod("e"))
	if err != nil {
		t.Fatal(err)
	}
	valid, err := issue(ctx, node, "team-v-valid0001", appPod("v"))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = node.Revoke(ctx, valid) }()
	// A role the driver did not make, expired, and named as one of ours.
	untagged := postgres.RoleName("team-u-untagged1")
	if err := pg.Exec(ctx, `CREATE ROLE `+untagged+` LOGIN VALID UNTIL '2000-01-01'`); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = pg.Exec(ctx, `DROP ROLE IF EXISTS `+untagged) }()

	held, err := login(ctx, expired)
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close(ctx)
	// VALID UNTIL passes (PostgreSQL checks it at login only: the held
	// session goes on).
	if err := pg.Exec(ctx, `ALTER ROLE `+expired.Values["username"]+` VALID UNTIL '`+
		time.Now().Add(-time.Second).UTC().Format(time.RFC3339)+`'`); err != nil {
		t.Fatal(err)
	}
	if _, err := held.Exec(ctx, `SELECT 1`); err != nil {
		t.Fatalf("the held session before the reap: %v", err)
	}
	rep, err := iss.Reap(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Expired < 1 || rep.Connections != 1 || rep.Failed != 0 {
		t.Fatalf("report %+v", rep)
	}
	if exists(t, expired.Values["username"]) {
		t.Error("the expired role survives")
	}
	if _, err := held.Exec(ctx, `SELECT 1`); err == nil {
		t.Error("the session held with the expired role still runs")
	}
	if !exists(t, valid.Values["username"]) {
		t.Error("a valid tagged role was reaped")
	}
	if !exists(t, untagged) {
		t.Error("a role without the tag was reaped")
	}
	if conn, err := login(ctx, valid); err != nil {
		t.Errorf("the valid role cannot log in after the reap: %v", err)
	} else {
		conn.Close(ctx)
	}
}

// With an Inventory, a tagged role that no record holds is reaped once
// it is older than the grace; recorded ones, and young ones, are not.
func TestReapDropsUntrackedRolesAfterTheGrace(t *testing.T) {
	ctx := context.Background()
	inv := newInventory()
	iss, clk := newIssuer(t, Options{Inventory: inv, UntrackedGrace: 10 * time.Second})
	node := postgres.NewNode(iss.Local())
	var leases []provider.Lease
	for _, id := range []string{"team-t-tracked01", "team-t-lost00001"} {
		l, err := issue(ctx, node, id, appPod(id[7:]))
		if err != nil {
			t.Fatal(err)
		}
		leases = append(leases, l)
	}
	defer func() { _ = node.Revoke(ctx, leases[0]) }()
	for _, l := range leases { // their status written (a record gone before that has its role dropped at once)
		inv.eventually(t, l.ID, "the record issued", func(_ credential.Record, state string) bool { return state == "issued" })
	}
	// The record of the second goes (a node lost, an inventory wiped).
	v := inv
	v.mu.Lock()
	delete(v.entries, leases[1].ID)
	v.mu.Unlock()

	rep, err := iss.Reap(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Untracked != 0 || !exists(t, leases[1].Values["username"]) {
		t.Fatalf("a role younger than the grace was reaped: %+v", rep)
	}
	clk.advance(20 * time.Second)
	if rep, err = iss.Reap(ctx); err != nil {
		t.Fatal(err)
	}
	if rep.Untracked != 1 || exists(t, leases[1].Values["username"]) {
		t.Fatalf("the untracked role was not reaped: %+v", rep)
	}
	if !exists(t, leases[0].Values["username"]) {
		t.Fatal("a tracked role was reaped")
	}
}

// Run reaps at once and then every interval, until its context ends.
func TestRunReapsUntilCancelled(t *testing.T) {
	ctx := context.Background()
	iss, _ := newIssuer(t, Options{ReapInterval: 50 * time.Millisecond})
	node := postgres.NewNode(iss.Local())
	l, err := issue(ctx, node, "team-w-run00001", appPod("w"))
	if err != nil {
		t.Fatal(err)
	}
	rctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { defer close(done); iss.Run(rctx) }()
	if err := pg.Exec(ctx, `ALTER ROLE `+l.Values["username"]+` VALID UNTIL '2000-01-01'`); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for exists(t, l.Values["username"]) && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	cancel()
	<-done
	if exists(t, l.Values["username"]) {
		t.Fatal("Run did not reap the expired role")
	}
}

// The admin of README's least-privilege section (CREATEROLE, no
// superuser) can do all the issuer does: mint with the tag and the quota's
// lock, extend, reap an expired role with its open session, drop.
func TestLeastPrivilegeAdminSuffices(t *testing.T) {
	ctx := context.Background()
	if err := pg.Exec(ctx, `CREATE ROLE csi_least LOGIN CREATEROLE PASSWORD 'least-admin'`); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = pg.Exec(ctx, `DROP ROLE IF EXISTS csi_least`) }()
	iss, clk := newIssuer(t, Options{Config: pgengine.Config{Connections: map[string]*pgengine.Connection{"main": {
		URL: pg.URL("csi_least", "least-admin"),
		Roles: map[string]*pgengine.Role{"app": {CreationStatements: []string{create}, MaxLive: 5,
			Allowed: []pgengine.Subject{{Namespace: "team", ServiceAccount: "app"}}}},
	}}}})
	node := postgres.NewNode(iss.Local())
	l, err := issue(ctx, node, "team-l-least001", appPod("l"))
	if err != nil {
		t.Fatal(err)
	}
	clk.advance(20 * time.Minute)
	if l, err = node.Renew(ctx, l); err != nil {
		t.Fatalf("extend: %v", err)
	}
	held, err := login(ctx, l)
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close(ctx)
	clk.advance(2 * time.Hour) // past VALID UNTIL, as the issuer sees it
	rep, err := iss.Reap(ctx)
	if err != nil || rep.Expired < 1 {
		t.Fatalf("reap: %+v, %v", rep, err)
	}
	if exists(t, l.Values["username"]) {
		t.Fatal("the least-privilege admin did not drop the role")
	}
	if _, err := held.Exec(ctx, `SELECT 1`); err == nil {
		t.Fatal("the session outlives the reaped role")
	}
	l2, err := issue(ctx, node, "team-l-least002", appPod("l"))
	if err != nil {
		t.Fatal(err)
	}
	if err := node.Revoke(ctx, l2); err != nil || exists(t, l2.Values["username"]) {
		t.Fatalf("drop: %v", err)
	}
}

// The reaper decides on a listing; a role extended between the listing
// and the drop is not dropped (the drop checks again under the role's
// lock, which an extension takes too).
func TestReapSparesARoleExtendedSinceTheListing(t *testing.T) {
	ctx := context.Background()
	iss, clk := newIssuer(t, Options{})
	node := postgres.NewNode(iss.Local())
	l, err := issue(ctx, node, "team-x-extended1", appPod("x"))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = node.Revoke(ctx, l) }()
	roles, err := iss.admin.Tagged(ctx, "main")
	if err != nil {
		t.Fatal(err)
	}
	var listed pgengine.TaggedRole
	for _, r := range roles {
		if r.Name == l.Values["username"] {
			listed = r
		}
	}
	clk.advance(50 * time.Minute) // the default TTL is 1h
	if l, err = node.Renew(ctx, l); err != nil {
		t.Fatal(err)
	}
	clk.advance(11 * time.Minute) // past the listed VALID UNTIL, not the extended one
	now := clk.now()
	notAfter := iss.notAfter("main", listed)
	if !expired(listed, notAfter, now) {
		t.Fatal("the listing does not look expired: the test proves nothing")
	}
	dropped, err := iss.reapOne(ctx, "main", listed, notAfter, "expired", now)
	if err != nil || dropped {
		t.Fatalf("reaped: %v, %v", dropped, err)
	}
	if !exists(t, l.Values["username"]) {
		t.Fatal("the extended role was dropped")
	}
}
