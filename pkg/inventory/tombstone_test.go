package inventory_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	v1alpha1 "github.com/ephemeral-secrets/csi-driver/pkg/apis/ephemeralsecrets/v1alpha1"
	"github.com/ephemeral-secrets/csi-driver/pkg/credential"
	"github.com/ephemeral-secrets/csi-driver/pkg/inventory"
	"github.com/ephemeral-secrets/csi-driver/pkg/issuer"
	pgengine "github.com/ephemeral-secrets/csi-driver/pkg/issuer/postgres"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider/postgres"
	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/kube"
	"github.com/ephemeral-secrets/csi-driver/test/pgtest"
)

// A real PostgreSQL for the tests that run the issuer itself, started by
// the first of them and stopped by TestMain.
var (
	pgOnce sync.Once
	pg     *pgtest.Server
	pgErr  error
)

func postgresServer(t *testing.T) *pgtest.Server {
	t.Helper()
	pgOnce.Do(func() { pg, pgErr = pgtest.Start() })
	if pgErr != nil {
		t.Fatal(pgErr)
	}
	return pg
}

func stopPostgres() {
	if pg != nil {
		pg.Close()
	}
}

// nodeMinter is the issuer as a node plugin reaches it: its node's
// identity on every call.
type nodeMinter struct {
	iss    *issuer.Issuer
	caller issuer.Caller
}

func (m nodeMinter) Mint(ctx context.Context, r postgres.MintRequest) (postgres.Grant, error) {
	return m.iss.Mint(ctx, m.caller, r)
}

func (m nodeMinter) Extend(ctx context.Context, r postgres.ExtendRequest) (postgres.Grant, error) {
	return m.iss.Extend(ctx, m.caller, r)
}

func (m nodeMinter) Drop(ctx context.Context, r postgres.DropRequest) error {
	return m.iss.Drop(ctx, m.caller, r)
}

// startRealIssuer runs the issuer's side (Recorder, Controller) with a
// real Issuer on a real PostgreSQL, its controller revoking through the
// Issuer's Drop as the issuer command does. It returns the node side of
// node (the postgres provider, which makes the verifier and asks the
// issuer).
func startRealIssuer(t *testing.T, ns, node string) *postgres.Provider {
	t.Helper()
	p, _, _ := startRealIssuerWith(t, ns, node, realIssuer{})
	return p
}

// realIssuer shapes startRealIssuerWith; the zero value is the issuer
// command's.
type realIssuer struct {
	// recorder, when set, is the Issuer's Inventory's Recorder (else one
	// on the issuer's client and the controller's informer).
	recorder *inventory.Recorder
	// wrap, when set, makes the Issuer's Inventory of the Recorder.
	wrap func(*inventory.Recorder) issuer.Inventory
	// creation is the role's creation statements (default: one CREATE
	// ROLE).
	creation []string
	// now and grace are the Issuer's clock and UntrackedGrace (default:
	// the Issuer's).
	now   func() time.Time
	grace time.Duration
}

// startRealIssuerWith is startRealIssuer shaped by o; it returns the
// Issuer and its Recorder too.
func startRealIssuerWith(t *testing.T, ns, node string, o realIssuer) (*postgres.Provider, *issuer.Issuer, *inventory.Recorder) {
	t.Helper()
	srv := postgresServer(t)
	rv := &revoker{}
	rec := startIssuer(t, rv, fastRetries)
	if o.recorder != nil {
		rec = o.recorder
	}
	var inv issuer.Inventory = rec
	if o.wrap != nil {
		inv = o.wrap(rec)
	}
	if o.creation == nil {
		o.creation = []string{`CREATE ROLE "{{.Name}}" LOGIN PASSWORD '{{.Password}}' VALID UNTIL '{{.Expiration}}'`}
	}
	iss, err := issuer.New(issuer.Options{Inventory: inv, Now: o.now, UntrackedGrace: o.grace, Config: pgengine.Config{Connections: map[string]*pgengine.Connection{
		"main": {URL: srv.AdminURL(), Roles: map[string]*pgengine.Role{"app": {
			DefaultTTL: pgengine.Duration{Duration: time.Minute}, MaxTTL: pgengine.Duration{Duration: time.Hour},
			CreationStatements: o.creation,
			Allowed:            []pgengine.Subject{{Namespace: ns, ServiceAccount: "default"}},
		}}},
	}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(iss.Close)
	rv.setThen(func(ctx context.Context, e credential.Record) error {
		conn, _, _ := strings.Cut(e.Role, "/")
		return iss.Drop(ctx, issuer.Caller{}, postgres.DropRequest{LeaseID: e.LeaseID, Name: e.Name,
			Params: map[string]string{postgres.ConnectionParam: conn}})
	})
	return postgres.NewNode(nodeMinter{iss, issuer.Caller{Node: node}}), iss, rec
}

// killScene is a pod with two volumes on a node of its own, and the
// issuer with its node's side.
type killScene struct {
	ns, node, volA, volB string
	pod                  *corev1.Pod
	p                    *postgres.Provider
}

func newKillScene(t *testing.T) killScene {
	t.Helper()
	ns := namespace(t)
	s := killScene{ns: ns, node: ns + "-a", volA: "csi-" + ns + "-vol-a", volB: "csi-" + ns + "-vol-b", pod: newPod(t, ns, "agent")}
	s.p = startRealIssuer(t, ns, s.node)
	return s
}

// mustPublish is publish that must succeed.
func (s killScene) mustPublish(t *testing.T, leaseID, volumeID string) provider.Lease {
	t.Helper()
	l, err := publish(context.Background(), s.p, s.pod, s.ns+leaseID, volumeID)
	if err != nil {
		t.Fatal(err)
	}
	harness.RememberSecret(l.Values["password"])
	return l
}

var tombParams = map[string]string{postgres.ConnectionParam: "main", postgres.RoleParam: "app"}

// publish asks for a credential of pod's volume as its node plugin does.
func publish(ctx context.Context, p *postgres.Provider, pod *corev1.Pod, leaseID, volumeID string) (provider.Lease, error) {
	l, err := p.Issue(ctx, provider.Request{
		LeaseID: leaseID, VolumeID: volumeID, Class: pod.Namespace + "/db", Params: tombParams,
		Pod: provider.Pod{Namespace: pod.Namespace, Name: pod.Name, UID: string(pod.UID), ServiceAccount: "default"},
	})
	l.ID, l.Params, l.Provider = leaseID, tombParams, postgres.Name
	return l, err
}

func roleExists(t *testing.T, name string) bool {
	t.Helper()
	ok, err := postgresServer(t).RoleExists(context.Background(), name)
	if err != nil {
		t.Fatal(err)
	}
	return ok
}

// TestKillWhileTheNodeIsDownHolds: the kill switch while the pod's node
// plugin is down. The record is revoked and gone before the node could
// see it; the tombstone it leaves refuses the volume a new credential
// (the rotation the node's failed renewal asks for), not the pod's other
// volume; the node, back, withdraws the volume at start-up; the garbage
// collector removes the tombstone with the pod.
func TestKillWhileTheNodeIsDownHolds(t *testing.T) {
	startGC(t)
	ctx := context.Background()
	sc := newKillScene(t)
	ns, pod, node, p, volA, volB := sc.ns, sc.pod, sc.node, sc.p, sc.volA, sc.volB
	killed := sc.mustPublish(t, "-agent-killed01", volA)
	other := sc.mustPublish(t, "-agent-other001", volB)

	// The node plugin is down: no watcher. The admin kills volume A's
	// credential.
	if err := adminInv.Delete(ctx, ns, inventory.Name(killed.ID), metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	gone(t, ns, inventory.Name(killed.ID))
	if roleExists(t, killed.Values["username"]) {
		t.Fatal("the killed credential's role still exists")
	}
	tomb, err := adminInv.Get(ctx, ns, inventory.TombstoneName(string(pod.UID), volA))
	if err != nil {
		t.Fatalf("no tombstone: %v", err)
	}
	if tomb.Status.State != v1alpha1.StateWithdrawn || len(tomb.Finalizers) != 0 || tomb.Spec.VolumeID != volA ||
		tomb.Spec.LeaseID != killed.ID || len(tomb.OwnerReferences) != 1 || tomb.OwnerReferences[0].UID != pod.UID ||
		tomb.Labels[v1alpha1.LabelNode] != node {
		t.Errorf("tombstone: finalizers %v, owners %+v, labels %v, spec %+v, status %+v",
			tomb.Finalizers, tomb.OwnerReferences, tomb.Labels, tomb.Spec, tomb.Status)
	}

	// The node comes back; its renewal finds the role gone, and the
	// rotation it then asks for is refused.
	if _, err := p.Renew(ctx, killed); !errors.Is(err, provider.ErrNotRenewable) {
		t.Errorf("renewing the killed credential: %v, want not renewable", err)
	}
	rotated := ns + "-agent-rotated1"
	_, err = publish(ctx, p, pod, rotated, volA)
	if !errors.Is(err, provider.ErrPermissionDenied) || !errors.Is(err, issuer.ErrWithdrawn) ||
		!strings.Contains(err.Error(), "the credential of this volume was withdrawn by deleting its Credential record") {
		t.Fatalf("a new credential for the killed volume: %v, want permission denied, withdrawn", err)
	}
	if roleExists(t, postgres.RoleName(rotated)) {
		t.Error("the refused mint made a role")
	}
	gone(t, ns, inventory.Name(rotated)) // its record, written before the check, is removed
	// The pod's other volume is not concerned: its credential lives, and
	// it is issued another.
	if !roleExists(t, other.Values["username"]) {
		t.Error("the other volume's credential was dropped")
	}
	another := sc.mustPublish(t, "-agent-another1", volB)

	// The node's watcher, started, withdraws volume A at once (the
	// tombstone, listed at start-up), not volume B.
	w := &withdrawals{}
	watchNode(t, node, w)
	harness.Eventually(t, 10*time.Second, "the node withdrew volume A", func() (bool, error) {
		return slices.ContainsFunc(w.all(), func(c [3]string) bool { return c[0] == volA }), nil
	})
	for _, c := range w.all() {
		if c[0] != volA || !strings.Contains(c[2], "withdrawn by deleting its Credential record") {
			t.Errorf("withdraw(%q, %q, %q)", c[0], c[1], c[2])
		}
	}

	// The pod goes: the garbage collector removes the tombstone (and
	// volume B's records, whose credentials are then revoked).
	if err := admin.CoreV1().Pods(ns).Delete(ctx, pod.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	gone(t, ns, tomb.Name)
	gone(t, ns, inventory.Name(another.ID))
	if roleExists(t, another.Values["username"]) {
		t.Error("the other volume's credential outlived its pod")
	}
}

// TestKillDeletesTheVolumesOtherRecords: a rotation's new lease minted
// as the kill happened (a second live record of the volume) is deleted
// with it, and revoked; the pod's other volume keeps its credential.
func TestKillDeletesTheVolumesOtherRecords(t *testing.T) {
	ctx := context.Background()
	sc := newKillScene(t)
	ns := sc.ns
	leases := []provider.Lease{
		sc.mustPublish(t, "-agent-old00001", sc.volA), sc.mustPublish(t, "-agent-new00001", sc.volA),
		sc.mustPublish(t, "-agent-volb0001", sc.volB),
	}
	if err := adminInv.Delete(ctx, ns, inventory.Name(leases[0].ID), metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	gone(t, ns, inventory.Name(leases[0].ID))
	gone(t, ns, inventory.Name(leases[1].ID))
	for i, want := range []bool{false, false, true} {
		if got := roleExists(t, leases[i].Values["username"]); got != want {
			t.Errorf("role of %s exists: %v, want %v", leases[i].ID, got, want)
		}
	}
	if c := get(t, ns, leases[2].ID); c.DeletionTimestamp != nil {
		t.Error("the other volume's record is being deleted")
	}
}

// TestNoTombstoneWhenThePodIsGone: a record deleted because its pod went
// (the controller's pod check here) leaves no tombstone.
func TestNoTombstoneWhenThePodIsGone(t *testing.T) {
	ns := namespace(t)
	ctx := context.Background()
	pod := newPod(t, ns, "short")
	rec := inventory.NewRecorder(issuerInv, nil)
	e := entryFor(pod, "node-a", ns+"-short-notomb01")
	record(t, rec, e)
	if err := admin.CoreV1().Pods(ns).Delete(ctx, pod.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	rv := &revoker{}
	startIssuer(t, rv, fastRetries)
	gone(t, ns, inventory.Name(e.LeaseID))
	if _, err := adminInv.Get(ctx, ns, inventory.TombstoneName(string(pod.UID), e.VolumeID)); !apierrors.IsNotFound(err) {
		t.Errorf("a tombstone for a pod gone: %v", err)
	}
	if calls := rv.leases(); !slices.Equal(calls, []string{e.LeaseID}) {
		t.Errorf("revocations %v", calls)
	}
}

// TestATombstoneThatCannotBeWrittenHoldsNoKillBack: the namespace refuses
// the tombstone (an admission policy refuses every new record there): the
// credential is revoked at once all the same; its record stays, saying
// why, until the tombstone is written.
func TestATombstoneThatCannotBeWrittenHoldsNoKillBack(t *testing.T) {
	ns := namespace(t)
	ctx := context.Background()
	pod := newPod(t, ns, "app")
	rv := &revoker{}
	rec := startIssuer(t, rv, fastRetries)
	e := entryFor(pod, "node-a", ns+"-app-refused01")
	record(t, rec, e)
	allow := refuseNewRecords(t, ns)
	if err := adminInv.Delete(ctx, ns, inventory.Name(e.LeaseID), metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	harness.Eventually(t, 10*time.Second, "revoked, the record saying the tombstone is pending", func() (bool, error) {
		c, err := adminInv.Get(ctx, ns, inventory.Name(e.LeaseID))
		if err != nil {
			return false, err
		}
		cond := meta.FindStatusCondition(c.Status.Conditions, v1alpha1.ConditionRevoked)
		return len(rv.leases()) > 0 && cond != nil && cond.Reason == "TombstoneFailed", nil
	})
	allow()
	gone(t, ns, inventory.Name(e.LeaseID))
	if c, err := adminInv.Get(ctx, ns, inventory.TombstoneName(string(pod.UID), e.VolumeID)); err != nil || !inventory.IsTombstone(c) {
		t.Errorf("the tombstone: %v, %v", c, err)
	}
}

// refuseNewRecords makes the API server refuse every new Credential in ns
// (an admission policy of the test's own), until the returned function
// (or the test's end) removes the policy.
func refuseNewRecords(t *testing.T, ns string) func() {
	t.Helper()
	ctx := context.Background()
	name := "esc-test-refuse-" + ns
	doc := fmt.Sprintf(`apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata: {name: %[1]s}
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules:
      - {apiGroups: [ephemeral-secrets.csi.dev], apiVersions: ["*"], resources: [credentials], operations: [CREATE]}
  matchConditions:
    - {name: the-namespace, expression: "object.metadata.namespace == '%[2]s'"}
  validations:
    - {expression: "false", message: "the test refuses new records in %[2]s"}
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata: {name: %[1]s}
spec: {policyName: %[1]s, validationActions: [Deny]}
`, name, ns)
	if err := kube.Apply(ctx, cluster.Config(), []byte(doc), false); err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	allow := func() {
		once.Do(func() {
			if err := admin.AdmissionregistrationV1().ValidatingAdmissionPolicyBindings().Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
				t.Error(err)
			}
			if err := admin.AdmissionregistrationV1().ValidatingAdmissionPolicies().Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
				t.Error(err)
			}
		})
	}
	t.Cleanup(allow)
	probe := &v1alpha1.Credential{
		ObjectMeta: metav1.ObjectMeta{GenerateName: "probe-", Namespace: ns},
		Spec:       v1alpha1.CredentialSpec{Pod: v1alpha1.PodReference{Name: "probe", UID: "probe"}, Node: "probe", Provider: "probe", LeaseID: "probe"},
	}
	harness.Eventually(t, 30*time.Second, "the test's policy in force", func() (bool, error) {
		c, err := adminInv.Create(ctx, probe)
		if err == nil {
			return false, adminInv.Delete(ctx, ns, c.Name, metav1.DeleteOptions{})
		}
		return strings.Contains(err.Error(), "the test refuses new records"), nil
	})
	return allow
}

// TestKillInANamespaceBeingDeleted: a namespace being deleted refuses
// new objects, the tombstone too; its pods go with it, so the record is
// revoked and goes without one.
func TestKillInANamespaceBeingDeleted(t *testing.T) {
	ns := namespace(t)
	ctx := context.Background()
	pod := newPod(t, ns, "app")
	rv := &revoker{}
	rec := startIssuer(t, rv, fastRetries)
	e := entryFor(pod, "node-a", ns+"-app-nsdeleted")
	record(t, rec, e)
	// No namespace controller runs here: the namespace stays Terminating
	// with its pod and record.
	if err := admin.CoreV1().Namespaces().Delete(ctx, ns, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := adminInv.Delete(ctx, ns, inventory.Name(e.LeaseID), metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	gone(t, ns, inventory.Name(e.LeaseID))
	if calls := rv.leases(); !slices.Equal(calls, []string{e.LeaseID}) {
		t.Errorf("revocations %v", calls)
	}
	if _, err := admin.CoreV1().Pods(ns).Get(ctx, pod.Name, metav1.GetOptions{}); err != nil {
		t.Errorf("the pod: %v (the test needs it alive)", err)
	}
}

// TestAKillTheNodeRevokedFirstStillLeavesItsTombstone: the node plugin's
// watcher withdraws the volume and its revocation reaches the issuer
// (Dropped) before the Controller took up the deleted record: the record
// is left to the Controller, which leaves the tombstone before it lets the
// record go (found by the real-cluster suite: the record was released and
// no tombstone written).
func TestAKillTheNodeRevokedFirstStillLeavesItsTombstone(t *testing.T) {
	ns := namespace(t)
	ctx := context.Background()
	pod := newPod(t, ns, "raced")
	rec := inventory.NewRecorder(issuerInv, nil)
	e := entryFor(pod, "node-a", ns+"-raced-tomb0001")
	record(t, rec, e)
	if err := adminInv.Delete(ctx, ns, inventory.Name(e.LeaseID), metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	// The node's revocation, through the issuer, before any controller runs.
	if err := rec.Dropped(ctx, e.LeaseID); err != nil {
		t.Fatal(err)
	}
	c, err := adminInv.Get(ctx, ns, inventory.Name(e.LeaseID))
	if err != nil || c.DeletionTimestamp == nil || !slices.Contains(c.Finalizers, v1alpha1.FinalizerRevoke) {
		t.Fatalf("the killed record after the node's drop: %v, %+v; want it held by the issuer's finalizer for the controller", err, c)
	}
	startIssuer(t, &revoker{}, fastRetries)
	gone(t, ns, inventory.Name(e.LeaseID))
	tomb, err := adminInv.Get(ctx, ns, inventory.TombstoneName(string(pod.UID), e.VolumeID))
	if err != nil || !inventory.IsTombstone(tomb) {
		t.Fatalf("no tombstone after the kill: %v", err)
	}
	// A drop of a record nobody deleted still lets it go at once.
	e2 := entryFor(pod, "node-a", ns+"-raced-live0001")
	e2.VolumeID = e.VolumeID + "-2"
	record(t, rec, e2)
	if err := rec.Dropped(ctx, e2.LeaseID); err != nil {
		t.Fatal(err)
	}
	gone(t, ns, inventory.Name(e2.LeaseID))
}

// TestADropLeavesATombstoneJustCreated: the tombstone is created (a copy
// of the killed record's spec, its lease ID too) before its status says
// Withdrawn; a drop of that lease in between (the node's withdrawal
// reaching the issuer) must not take it for the record and delete it.
func TestADropLeavesATombstoneJustCreated(t *testing.T) {
	ns := namespace(t)
	ctx := context.Background()
	pod := newPod(t, ns, "early")
	e := entryFor(pod, "node-a", ns+"-early-tomb0001")
	name := inventory.TombstoneName(string(pod.UID), e.VolumeID)
	c := &v1alpha1.Credential{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: map[string]string{v1alpha1.LabelLeaseID: e.LeaseID}},
		Spec: v1alpha1.CredentialSpec{Pod: v1alpha1.PodReference{Name: pod.Name, UID: string(pod.UID)}, Node: e.Node,
			Provider: e.Provider, LeaseID: e.LeaseID, VolumeID: e.VolumeID},
	}
	if _, err := issuerInv.Create(ctx, c); err != nil {
		t.Fatal(err)
	}
	if err := inventory.NewRecorder(issuerInv, nil).Dropped(ctx, e.LeaseID); err != nil {
		t.Fatal(err)
	}
	if _, err := adminInv.Get(ctx, ns, name); err != nil {
		t.Fatalf("a drop of the lease deleted the tombstone being written: %v", err)
	}
}
