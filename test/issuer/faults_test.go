package issuer

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ephemeral-secrets/csi-driver/pkg/audit"
	"github.com/ephemeral-secrets/csi-driver/pkg/inventory"
	"github.com/ephemeral-secrets/csi-driver/pkg/issuer/remote"
	"github.com/ephemeral-secrets/csi-driver/pkg/lease"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/storage"
	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/issuertest"
	"github.com/ephemeral-secrets/csi-driver/test/kubelet"
)

// churnRole is a role of short TTLs (renewed every few seconds, rotated
// at maxTTL) whose statements sleep for as long as the test's fault table
// says, at the step it names: a request is then provably mid-way (its
// backend is in pg_sleep, as pg_stat_activity shows) when its replica is
// killed. Mid-issue the role is made but not committed; mid-renewal the
// extension is not committed and its advisory lock held; mid-revocation
// the role refuses logins but is not dropped.
const churnRole = `        churn:
          defaultTTL: 6s
          maxTTL: 12s
          creationStatements:
            - CREATE ROLE "{{.Name}}" LOGIN PASSWORD '{{.Password}}' VALID UNTIL '{{.Expiration}}'
            - SELECT pg_sleep(delay) FROM esc_faults WHERE step = 'issue' AND '{{.Name}}' <> ''
          renewStatements:
            - ALTER ROLE "{{.Name}}" VALID UNTIL '{{.Expiration}}'
            - SELECT pg_sleep(delay) FROM esc_faults WHERE step = 'renew' AND '{{.Name}}' <> ''
          revocationStatements:
            - ALTER ROLE "{{.Name}}" NOLOGIN
            - SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{{.Name}}' AND pid <> pg_backend_pid()
            - SELECT pg_sleep(delay) FROM esc_faults WHERE step = 'revoke' AND '{{.Name}}' <> ''
            - DROP OWNED BY "{{.Name}}"
            - DROP ROLE IF EXISTS "{{.Name}}"
          allowed:
            - namespace: shop
              serviceAccount: orders
`

const churnClass = `apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: churn-db
  namespace: shop
spec:
  provider: postgres
  parameters:
    connection: main
    role: churn
`

// faultDelay is how long a faulted statement sleeps: the kill lands
// within it.
const faultDelay = 1500 * time.Millisecond

// The issuer's replicas are SIGKILLed, each in turn, while a request of
// the node plugin is mid-way in the database: mid-issue, mid-renewal and
// mid-revocation; then the leader mid-reap. Meanwhile a node plugin
// publishes, renews, rotates and unpublishes volumes without pause,
// through a front that stands for the Service. Once it is quiet: no role
// the issuer tagged is left, nor any Credential, the node's queue is
// empty and every revocation it queued was confirmed (its audit), and
// every credential a pod got logged in. Leader failover times are
// reported (MEASURED lines), not asserted.
func TestIssuerKilledMidRequest(t *testing.T) {
	ctx := context.Background()
	if err := pg.Exec(ctx, `CREATE TABLE IF NOT EXISTS esc_faults (step text PRIMARY KEY, delay float8 NOT NULL)`,
		`DELETE FROM esc_faults`); err != nil {
		t.Fatal(err)
	}
	before, err := escRoles(ctx)
	if err != nil {
		t.Fatal(err)
	}

	// Two replicas of this test's configuration (each names itself to
	// PostgreSQL, so the test sees whose request sleeps), quick to elect
	// and to reap; the package's replicas make way and come back after.
	stopIssuers()
	clear(replicas)
	t.Cleanup(func() { stopIssuers(); clear(replicas) })
	flags := []string{"--reap-interval", "1s", "--leader-election-lease-duration", "4s",
		"--leader-election-renew-deadline", "3s", "--leader-election-retry-period", "500ms"}
	ids := []string{"issuer-1", "issuer-2"}
	files := map[string]string{}
	for _, id := range ids {
		files[id] = filepath.Join(dir, "backends-"+id+".yaml")
		cfg := BackendConfig(pg.AdminURL()+"&application_name=esc-"+id) + churnRole
		if err := os.WriteFile(files[id], []byte(cfg), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	const node = "test-node" // harness.Driver's --node-id
	dp, err := objs.Node(ctx, node)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := objs.Token(ctx, dp, remote.Audience)
	if err != nil {
		t.Fatal(err)
	}
	// start starts replica id and waits until it serves.
	start := func(id, addr string) {
		t.Helper()
		is, err := issuertest.StartIssuer(bin, id, addr, issuerKubeconfig, files[id], flags...)
		if err != nil {
			t.Fatal(err)
		}
		replicas[id] = is
		c := clientAt(t, is.URL(), tok)
		harness.Eventually(t, 60*time.Second, id+" serving", func() (bool, error) {
			return c.Revoke(ctx, provider.Lease{ID: "probe", Params: params}) == nil, nil
		})
	}
	for _, id := range ids {
		start(id, "")
	}
	front, err := issuertest.NewFront(replicas["issuer-1"].Addr, replicas["issuer-2"].Addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(front.Close)
	harness.Eventually(t, 30*time.Second, "a leader", func() (bool, error) {
		id, err := issuertest.Leader(ctx, admin)
		return replicas[id] != nil, err
	})

	env, err := harness.NewEnv()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = env.Close() })
	tokenFile, err := issuertest.WriteToken(env.Base, "issuer-token", tok)
	if err != nil {
		t.Fatal(err)
	}
	classes := filepath.Join(env.Base, "classes.yaml")
	if err := os.WriteFile(classes, []byte(churnClass), 0o600); err != nil {
		t.Fatal(err)
	}
	auditLog := harness.LogPath("faults-node-audit")
	drv := &harness.Driver{Bin: nodeBin, Env: env, LogFile: harness.LogPath("faults-node"), Args: []string{
		"--classes-file", classes, "--kubeconfig", driverKubeconfig, "--audit-log", auditLog,
		"--issuer-address", front.URL(), "--issuer-token-file", tokenFile,
		"--issuer-ca-configmap", issuertest.IssuerNamespace + "/ephemeral-secrets-csi-issuer-ca",
		"--retry-min", "200ms", "--retry-max", "2s", "--rotation-grace", "1s", "--sweep-interval", "5s",
		"--backend-timeout", "10s"}}
	k := startNode(t, drv)

	// The workload: four pods at a time, each published (retried as
	// kubelet does), held 2 to 18 s (past a renewal; many past maxTTL, a
	// rotation), unpublished (retried), then the next.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	quiesce := sync.OnceFunc(func() { close(stop); wg.Wait() })
	t.Cleanup(quiesce)     // before the driver stops
	var published sync.Map // role name → pod
	for slot := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				churn(t, k, node, fmt.Sprintf("churn-%d-%d", slot, i), stop, &published)
			}
		}()
	}

	// The campaign.
	fault := func(step string) {
		t.Helper()
		if err := pg.Exec(ctx, fmt.Sprintf(`INSERT INTO esc_faults VALUES ('%s', %f)`, step, faultDelay.Seconds())); err != nil {
			t.Fatal(err)
		}
	}
	unfault := func() {
		t.Helper()
		if err := pg.Exec(ctx, `DELETE FROM esc_faults`); err != nil {
			t.Fatal(err)
		}
	}
	other := map[string]string{"issuer-1": "issuer-2", "issuer-2": "issuer-1"}
	for _, victim := range ids {
		for _, step := range []string{"issue", "renew", "revoke"} {
			is := replicas[victim]
			front.Route(is.Addr)
			fault(step)
			caught := sleeping(t, victim, step, "", 60*time.Second)
			wasLeader := leaderIs(victim)
			killed := time.Now()
			is.Kill()
			unfault()
			t.Logf("killed %s mid-%s (%s)", victim, step, caught)
			if wasLeader {
				took := waitLeader(t, other[victim], killed)
				t.Logf("MEASURED leader failover (SIGKILL of %s mid-%s): %s", victim, step, took.Round(10*time.Millisecond))
			}
			start(victim, is.Addr)
		}
	}

	// Mid-reap: a role no node renews or revokes (its plugin's answer
	// lost, the node gone) expires; the leader reaping it is killed mid-way;
	// the other leads and reaps it.
	orphan := clientAt(t, front.URL(), tok)
	p, _, err := objs.TenantPod(ctx, "shop", "churn-orphan", "orders", node, "churn-db")
	if err != nil {
		t.Fatal(err)
	}
	const orphanLease = "fault-orphan-1"
	l, err := orphan.Issue(ctx, provider.Request{LeaseID: orphanLease, Class: "shop/churn-db",
		Params: map[string]string{"connection": "main", "role": "churn"}, Pod: p})
	if err != nil {
		t.Fatal(err)
	}
	harness.RememberSecret(l.Values["password"])
	published.Store(l.Values["username"], p.Name)
	leader, err := issuertest.Leader(ctx, admin)
	if err != nil || replicas[leader] == nil {
		t.Fatalf("leader %q: %v", leader, err)
	}
	fault("revoke")
	// It expires in 6 s; the leader reaps within a second more: no
	// leader reaping it (a reaper that does not run) fails here.
	caught := sleeping(t, leader, "revoke", l.Values["username"], 30*time.Second)
	killed := time.Now()
	replicas[leader].Kill()
	unfault()
	t.Logf("killed the leader %s mid-reap (%s)", leader, caught)
	took := waitLeader(t, other[leader], killed)
	t.Logf("MEASURED leader failover (SIGKILL of the leader mid-reap): %s", took.Round(10*time.Millisecond))
	harness.Eventually(t, 60*time.Second, "the orphan reaped by the new leader", func() (bool, error) {
		ok, err := pg.RoleExists(ctx, l.Values["username"])
		return !ok, err
	})
	t.Logf("MEASURED SIGKILL of the leader mid-reap to the role reaped by the next: %s", time.Since(killed).Round(10*time.Millisecond))
	start(leader, replicas[leader].Addr)

	// Quiet: every pod unpublished, the node's queue drained.
	quiesce()
	store, err := storage.OpenExisting(env.StateDir)
	if err != nil {
		t.Fatal(err)
	}
	harness.Eventually(t, 60*time.Second, "the node's leases all revoked", func() (bool, error) {
		inv, err := lease.ReadInventory(lease.NewStateRecords(store))
		if err != nil || len(inv.Live)+len(inv.Pending) > 0 {
			return false, fmt.Errorf("%d live, %d pending revocations (%v)", len(inv.Live), len(inv.Pending), err)
		}
		return true, nil
	})
	n := 0
	published.Range(func(any, any) bool { n++; return true })
	t.Logf("%d credentials published", n)

	// Every revocation the node queued, and every lease it was issued,
	// was confirmed revoked by the issuer.
	issued, confirmed, steps, err := nodeRevocations(auditLog)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("node steps: %d issued, %d renewed, %d rotated, %d revoked", steps[audit.Issue], steps[audit.Renew], steps[audit.Rotate], steps[audit.Revoke])
	for id := range issued {
		if !confirmed[id] {
			t.Errorf("lease %s: queued or issued, never confirmed revoked", id)
		}
	}
	if len(issued) == 0 {
		t.Error("the node's audit records no lease")
	}

	// No role of the campaign is left: none tagged of the churn role, and
	// no role of the driver's names that was not there before (an
	// untagged one would be a leak the reaper could never see).
	harness.Eventually(t, 30*time.Second, "no role of the campaign left", func() (bool, error) {
		now, err := escRoles(ctx)
		if err != nil {
			return false, err
		}
		var left []string
		for name, comment := range now {
			if _, old := before[name]; !old || strings.Contains(comment, "role=main/churn ") {
				left = append(left, name)
			}
		}
		if len(left) > 0 {
			return false, fmt.Errorf("left: %v", left)
		}
		return true, nil
	})
	inv, err := inventory.NewClient(cluster.Config())
	if err != nil {
		t.Fatal(err)
	}
	harness.Eventually(t, 30*time.Second, "no Credential of the campaign left", func() (bool, error) {
		recs, err := inv.List(ctx, "shop", metav1.ListOptions{})
		if err != nil {
			return false, err
		}
		var left []string
		for _, r := range recs.Items {
			if strings.HasPrefix(r.Spec.Pod.Name, "churn-") {
				left = append(left, r.Name)
			}
		}
		if len(left) > 0 {
			return false, fmt.Errorf("left: %v", left)
		}
		return true, nil
	})
}

// churn is one pod's life: published until it is (or until stop), its
// credential tried, held, unpublished until OK.
func churn(t *testing.T, k *kubelet.Kubelet, node, name string, stop <-chan struct{}, published *sync.Map) {
	ctx := context.Background()
	p, _, err := objs.TenantPod(ctx, "shop", name, "orders", node, "churn-db")
	if err != nil {
		t.Errorf("pod %s: %v", name, err)
		return
	}
	pod := kubelet.Pod{Namespace: p.Namespace, Name: p.Name, UID: p.UID, ServiceAccount: p.ServiceAccount}
	vol := kubelet.Volume{Name: issuertest.VolumeName, ReadOnly: true, Attributes: map[string]string{"secretProviderClass": "churn-db"}}
	defer func() {
		for deadline := time.Now().Add(time.Minute); ; {
			err := k.Unpublish(ctx, pod, vol.Name)
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				t.Errorf("unpublish %s: %v", name, err)
				return
			}
			time.Sleep(200 * time.Millisecond)
		}
		_ = k.RemovePod(pod)
	}()
	var target string
	for {
		if target, err = k.Publish(ctx, pod, vol); err == nil {
			break
		}
		select {
		case <-stop:
			return
		case <-time.After(200 * time.Millisecond):
		}
	}
	user, err1 := os.ReadFile(filepath.Join(target, "username"))
	password, err2 := os.ReadFile(filepath.Join(target, "password"))
	if err1 != nil || err2 != nil {
		t.Errorf("pod %s: files: %v %v", name, err1, err2)
		return
	}
	harness.RememberSecret(string(password))
	published.Store(string(user), name)
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	conn, err := pgx.Connect(cctx, pg.URL(string(user), string(password)))
	cancel()
	if err != nil {
		t.Errorf("pod %s got a credential it cannot log in with: %v", name, err)
	} else {
		_ = conn.Close(ctx)
	}
	select {
	case <-stop:
	case <-time.After(2*time.Second + rand.N(16*time.Second)):
	}
	// A rotation's credential, for the log check.
	if b, err := os.ReadFile(filepath.Join(target, "password")); err == nil {
		harness.RememberSecret(string(b))
	}
}

// sleeping waits until a backend of replica id is in the pg_sleep of a
// faulted step (of the role named, if any) and says what it runs.
func sleeping(t *testing.T, id, step, role string, timeout time.Duration) string {
	t.Helper()
	var query string
	harness.Eventually(t, timeout, id+" mid-"+step, func() (bool, error) {
		conn, err := pgx.Connect(context.Background(), pg.AdminURL())
		if err != nil {
			return false, err
		}
		defer conn.Close(context.Background())
		err = conn.QueryRow(context.Background(), `SELECT query FROM pg_stat_activity
			WHERE application_name = $1 AND state = 'active' AND query LIKE 'SELECT pg_sleep%' AND query LIKE $2 AND query LIKE $3
			LIMIT 1`, "esc-"+id, "%step = '"+step+"'%", "%"+role+"%").Scan(&query)
		if err == pgx.ErrNoRows {
			return false, nil
		}
		return err == nil, err
	})
	return query
}

func leaderIs(id string) bool {
	l, err := issuertest.Leader(context.Background(), admin)
	return err == nil && l == id
}

// waitLeader waits until id holds the Lease and returns the time since
// from.
func waitLeader(t *testing.T, id string, from time.Time) time.Duration {
	t.Helper()
	harness.Eventually(t, 60*time.Second, id+" leading", func() (bool, error) { return leaderIs(id), nil })
	return time.Since(from)
}

// escRoles are the roles of the driver's names (esc_...) with their
// comments.
func escRoles(ctx context.Context) (map[string]string, error) {
	conn, err := pgx.Connect(ctx, pg.AdminURL())
	if err != nil {
		return nil, err
	}
	defer conn.Close(ctx)
	rows, err := conn.Query(ctx, `SELECT rolname, coalesce(shobj_description(oid, 'pg_authid'), '') FROM pg_roles WHERE rolname LIKE 'esc\_%'`)
	if err != nil {
		return nil, err
	}
	roles := map[string]string{}
	for rows.Next() {
		var name, comment string
		if err := rows.Scan(&name, &comment); err != nil {
			return nil, err
		}
		roles[name] = comment
	}
	return roles, rows.Err()
}

// nodeRevocations reads the node's audit log: the leases it was issued or
// queued a revocation of, those whose revocation the backend confirmed,
// and how many successful steps of each stage it saw.
func nodeRevocations(path string) (issued, confirmed map[string]bool, steps map[audit.Stage]int, err error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, nil, err
	}
	defer f.Close()
	issued, confirmed, steps = map[string]bool{}, map[string]bool{}, map[audit.Stage]int{}
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var r audit.Record
		if json.Unmarshal(sc.Bytes(), &r) != nil || r.LeaseID == "" {
			continue
		}
		if r.Outcome == audit.Success {
			steps[r.Stage]++
		}
		switch {
		case r.Stage == audit.Issue && r.Outcome == audit.Success, r.Stage == audit.Revoke && r.Outcome == audit.Pending:
			issued[r.LeaseID] = true
		case r.Stage == audit.Revoke && r.Outcome == audit.Success:
			confirmed[r.LeaseID] = true
		}
	}
	return issued, confirmed, steps, sc.Err()
}
