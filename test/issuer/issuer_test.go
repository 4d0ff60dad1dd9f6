package issuer

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	v1alpha1 "github.com/ephemeral-secrets/csi-driver/pkg/apis/ephemeralsecrets/v1alpha1"
	"github.com/ephemeral-secrets/csi-driver/pkg/inventory"
	"github.com/ephemeral-secrets/csi-driver/pkg/issuer/remote"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider/postgres"
	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/issuertest"
)

// replicas are the running issuers by ID.
var replicas = map[string]*issuertest.Issuer{}

// startIssuers starts the replicas that are not running and waits until
// each serves.
func startIssuers(t *testing.T) {
	t.Helper()
	for _, id := range []string{"issuer-1", "issuer-2"} {
		addr := ""
		if is := replicas[id]; is != nil && !is.Exited() {
			continue
		} else if is != nil {
			addr = is.Addr
		}
		is, err := issuertest.StartIssuer(bin, id, addr, issuerKubeconfig, backends)
		if err != nil {
			t.Fatal(err)
		}
		replicas[id] = is
	}
	for id, is := range replicas {
		node := nodeFor(t, "node-a", is)
		harness.Eventually(t, 60*time.Second, id+" serving", func() (bool, error) {
			if is.Exited() {
				return false, fmt.Errorf("%s exited; log %s", id, is.LogFile)
			}
			err := node.Revoke(context.Background(), provider.Lease{ID: "probe", Params: params})
			return err == nil, nil
		})
	}
}

func stopIssuers() {
	for _, is := range replicas {
		is.Stop()
	}
}

var params = map[string]string{"connection": "main", "role": "app"}

// nodeFor is the postgres provider of a node plugin on node, asking is,
// with a token bound to the driver's pod on node.
func nodeFor(t *testing.T, node string, is *issuertest.Issuer) *postgres.Provider {
	t.Helper()
	ctx := context.Background()
	pod, err := objs.Node(ctx, node)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := objs.Token(ctx, pod, remote.Audience)
	if err != nil {
		t.Fatal(err)
	}
	return clientWith(t, is, tok)
}

func clientWith(t *testing.T, is *issuertest.Issuer, token string) *postgres.Provider {
	t.Helper()
	return clientAt(t, is.URL(), token)
}

// clientAt is the postgres provider of a node plugin asking the issuer at
// url with token.
func clientAt(t *testing.T, url, token string) *postgres.Provider {
	t.Helper()
	path, err := issuertest.WriteToken(t.TempDir(), "token", token)
	if err != nil {
		t.Fatal(err)
	}
	c, err := remote.NewClient(remote.ClientOptions{URL: url, TokenFile: path,
		Roots: remote.RootsConfigMap(driverClients, issuertest.IssuerNamespace, "ephemeral-secrets-csi-issuer-ca")})
	if err != nil {
		t.Fatal(err)
	}
	return postgres.NewNode(c)
}

func tenant(t *testing.T, name, node string) provider.Pod {
	t.Helper()
	pod, _, err := objs.TenantPod(context.Background(), "shop", name, "orders", node, "orders-db")
	if err != nil {
		t.Fatal(err)
	}
	return pod
}

func issue(p *postgres.Provider, lease string, pod provider.Pod) (provider.Lease, error) {
	l, err := p.Issue(context.Background(), provider.Request{LeaseID: lease, Class: "shop/orders-db", Params: params, Pod: pod})
	if err == nil {
		harness.RememberSecret(l.Values["password"])
	}
	return l, err
}

func roleExists(t *testing.T, lease string) bool {
	t.Helper()
	ok, err := pg.RoleExists(context.Background(), postgres.RoleName(lease))
	if err != nil {
		t.Fatal(err)
	}
	return ok
}

// A node plugin asking for a pod on its node gets a role the pod logs in
// with; the issuer never saw the password. Revoked, the role is gone.
func TestValidRequestGivesALoginRole(t *testing.T) {
	startIssuers(t)
	node := nodeFor(t, "node-a", replicas["issuer-1"])
	lease := "valid-1"
	short := map[string]string{"connection": "main", "role": "app", "ttl": "10s"}
	l, err := node.Issue(context.Background(), provider.Request{LeaseID: lease, Class: "shop/orders-db", Params: short, Pod: tenant(t, "orders-0", "node-a")})
	if err != nil {
		t.Fatal(err)
	}
	harness.RememberSecret(l.Values["password"])
	l.ID, l.Params = lease, short // as the lease manager keeps it
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, pg.URL(l.Values["username"], l.Values["password"]))
	if err != nil {
		t.Fatalf("the pod cannot log in with its credential: %v", err)
	}
	var one int
	if err := conn.QueryRow(ctx, "SELECT 1").Scan(&one); err != nil || one != 1 {
		t.Fatalf("SELECT 1 = %d, %v", one, err)
	}
	conn.Close(ctx)
	// The other replica extends and drops it: decisions are stateless.
	other := nodeFor(t, "node-a", replicas["issuer-2"])
	time.Sleep(2100 * time.Millisecond) // worth extending (a tenth of the TTL), at VALID UNTIL's second resolution
	if r, err := other.Renew(ctx, l); err != nil {
		t.Errorf("renew through the other replica: %v", err)
	} else if until, err := pg.ValidUntil(ctx, l.Values["username"]); err != nil || !until.Equal(r.ExpiresAt) {
		t.Errorf("VALID UNTIL %s (%v), want the renewed %s", until, err, r.ExpiresAt)
	}
	if err := other.Revoke(ctx, l); err != nil {
		t.Fatal(err)
	}
	if roleExists(t, "valid-1") {
		t.Error("the role survived its revocation")
	}
}

// A node plugin asking for a pod scheduled on another node is refused,
// and no role is made.
func TestPodOnAnotherNodeIsDenied(t *testing.T) {
	startIssuers(t)
	denied(t, nodeFor(t, "node-a", replicas["issuer-1"]), "other-node-1", tenant(t, "orders-b", "node-b"))
}

// denied checks that asking node for a role for pod is refused, and that
// no role is made.
func denied(t *testing.T, node *postgres.Provider, lease string, pod provider.Pod) {
	t.Helper()
	if _, err := issue(node, lease, pod); !errors.Is(err, provider.ErrPermissionDenied) {
		t.Fatalf("err = %v, want PermissionDenied", err)
	}
	if roleExists(t, lease) {
		t.Error("a role was made for a refused request")
	}
}

// A token of another service account (a tenant pod's, bound to its pod
// on the node) is refused, and no role is made.
func TestTokenOfAnotherServiceAccountIsRefused(t *testing.T) {
	startIssuers(t)
	pod := tenant(t, "orders-sa", "node-a")
	tok, err := objs.PodToken(context.Background(), "shop", pod.Name, remote.Audience)
	if err != nil {
		t.Fatal(err)
	}
	denied(t, clientWith(t, replicas["issuer-1"], tok), "other-sa-1", pod)
}

// With no issuer running, every call is Unavailable (kubelet retries a
// publish; the lease manager keeps a revocation queued); started again,
// the queued revocation goes through.
func TestIssuerDownIsUnavailable(t *testing.T) {
	startIssuers(t)
	node := nodeFor(t, "node-a", replicas["issuer-1"])
	pod := tenant(t, "orders-down", "node-a")
	lease := "down-1"
	l, err := issue(node, lease, pod)
	if err != nil {
		t.Fatal(err)
	}
	l.ID, l.Params = lease, params // as the lease manager keeps it
	stopIssuers()
	ctx := context.Background()
	if _, err := issue(node, "down-2", pod); !errors.Is(err, provider.ErrUnavailable) {
		t.Errorf("issue: err = %v, want Unavailable", err)
	}
	if _, err := node.Renew(ctx, l); !errors.Is(err, provider.ErrUnavailable) {
		t.Errorf("renew: err = %v, want Unavailable", err)
	}
	if err := node.Revoke(ctx, l); !errors.Is(err, provider.ErrUnavailable) {
		t.Errorf("revoke: err = %v, want Unavailable", err)
	}
	startIssuers(t)
	if err := node.Revoke(ctx, l); err != nil {
		t.Fatalf("revoke after the issuer is back: %v", err)
	}
	if roleExists(t, "down-1") {
		t.Error("the role survived its revocation")
	}
}

// One replica leads (reaps); killed, the other takes the Lease after it
// expires, and serves requests meanwhile; stopped (SIGTERM), the leader
// releases the Lease and the other leads at once. The times are
// reported, not asserted.
func TestLeaderFailover(t *testing.T) {
	startIssuers(t)
	ctx := context.Background()
	leader := func() string {
		id, err := issuertest.Leader(ctx, admin)
		if err != nil {
			return ""
		}
		return id
	}
	harness.Eventually(t, 60*time.Second, "a leader", func() (bool, error) { return replicas[leader()] != nil, nil })
	for _, how := range []string{"SIGKILL", "SIGTERM"} {
		old := leader()
		// Only the Lease's holder says it leads (and so reaps).
		harness.Eventually(t, 10*time.Second, "one replica leading", func() (bool, error) {
			for id, is := range replicas {
				leading, err := is.Leading()
				if err != nil || leading != (id == old) {
					return false, err
				}
			}
			return true, nil
		})
		next := "issuer-1"
		if old == next {
			next = "issuer-2"
		}
		start := time.Now()
		led := make(chan time.Duration, 1)
		go func() { // watches the Lease while the other replica serves
			for leader() != next && time.Since(start) < time.Minute {
				time.Sleep(50 * time.Millisecond)
			}
			led <- time.Since(start)
		}()
		if how == "SIGKILL" {
			replicas[old].Kill()
		} else {
			replicas[old].Stop()
		}
		// The other replica serves while no one leads.
		if _, err := issue(nodeFor(t, "node-a", replicas[next]), "failover-"+strings.ToLower(how), tenant(t, "orders-"+strings.ToLower(how), "node-a")); err != nil {
			t.Errorf("%s: the other replica does not serve: %v", how, err)
		}
		took := <-led
		if leader() != next {
			t.Fatalf("%s: %s does not lead after %s", how, next, took)
		}
		log, err := os.ReadFile(replicas[next].LogFile)
		if err != nil || !strings.Contains(string(log), "Leading: reaping") {
			t.Errorf("%s: the new leader does not say it reaps", how)
		}
		t.Logf("leader failover after %s of the leader: %s", how, took.Round(10*time.Millisecond))
		fmt.Printf("FAILOVER %s %.2fs\n", how, took.Seconds())
		startIssuers(t)
	}
}

// The issuer keeps the inventory: a role minted through the transport
// has its record, of the asking node; deleting the record (the kill
// switch) has the leader drop the role, whichever replica minted it.
func TestKillSwitchThroughTheIssuer(t *testing.T) {
	startIssuers(t)
	ctx := context.Background()
	inv, err := inventory.NewClient(cluster.Config())
	if err != nil {
		t.Fatal(err)
	}
	for i, is := range []*issuertest.Issuer{replicas["issuer-1"], replicas["issuer-2"]} {
		lease := fmt.Sprintf("kill-%d", i)
		if _, err := issue(nodeFor(t, "node-a", is), lease, tenant(t, "orders-"+lease, "node-a")); err != nil {
			t.Fatal(err)
		}
		recs, err := inv.List(ctx, "shop", metav1.ListOptions{LabelSelector: v1alpha1.LabelLeaseID + "=" + lease})
		if err != nil || len(recs.Items) != 1 {
			t.Fatalf("records of %s: %v, %v", lease, recs, err)
		}
		if rec := recs.Items[0]; rec.Labels[v1alpha1.LabelNode] != "node-a" {
			t.Errorf("record's node %q, want node-a", rec.Labels[v1alpha1.LabelNode])
		}
		if err := inv.Delete(ctx, "shop", recs.Items[0].Name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		harness.Eventually(t, 30*time.Second, "the role dropped", func() (bool, error) {
			ok, err := pg.RoleExists(ctx, postgres.RoleName(lease))
			return !ok, err
		})
	}
}
