package inventory_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	v1alpha1 "github.com/ephemeral-secrets/csi-driver/pkg/apis/ephemeralsecrets/v1alpha1"
	"github.com/ephemeral-secrets/csi-driver/pkg/inventory"
	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/kube"
)

// The service accounts of the node plugin and the issuer as the chart
// names them.
const (
	pluginNamespace = "ephemeral-secrets"
	pluginAccount   = "ephemeral-secrets-csi"
	issuerAccount   = "ephemeral-secrets-csi-issuer"
)

// setUpPolicies makes the chart's namespace, the service accounts of the
// plugin and the issuer with the chart's inventory roles, and applies the
// chart's policies, rendered for them as the chart's tpl does; it waits
// until they are in force and sets issuerCfg.
func setUpPolicies(ctx context.Context) error {
	errs := []error{ignoreExists(admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: pluginNamespace}}, metav1.CreateOptions{}))}
	for account, role := range map[string]string{pluginAccount: "ephemeral-secrets-csi-node-inventory", issuerAccount: "ephemeral-secrets-csi-issuer-inventory"} {
		errs = append(errs,
			ignoreExists(admin.CoreV1().ServiceAccounts(pluginNamespace).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: account}}, metav1.CreateOptions{})),
			ignoreExists(admin.RbacV1().ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{
				ObjectMeta: metav1.ObjectMeta{Name: "esc-test-" + account},
				RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: role},
				Subjects:   []rbacv1.Subject{{Kind: "ServiceAccount", Namespace: pluginNamespace, Name: account}},
			}, metav1.CreateOptions{})))
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	path := filepath.Join(repoRoot, "deploy/helm/ephemeral-secrets-csi/files/inventory-policies.yaml")
	raw, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	doc := strings.NewReplacer(`{{ .Release.Namespace }}`, pluginNamespace, `{{ include "esc.fullname" . }}`, pluginAccount,
		`{{ include "esc.issuerName" . }}`, issuerAccount).Replace(string(raw))
	if strings.Contains(doc, "{{") {
		return fmt.Errorf("%s has template expressions the test does not render", path)
	}
	if err := kube.Apply(ctx, cluster.Config(), []byte(doc), false); err != nil {
		return err
	}
	token, err := accountToken(ctx, issuerAccount, nil)
	if err != nil {
		return err
	}
	issuerCfg = as(token)
	// In force once the admin is refused the issuer's finalizer.
	probe := &v1alpha1.Credential{
		ObjectMeta: metav1.ObjectMeta{GenerateName: "probe-", Namespace: pluginNamespace, Finalizers: []string{v1alpha1.FinalizerRevoke}},
		Spec:       v1alpha1.CredentialSpec{Pod: v1alpha1.PodReference{Name: "probe", UID: "probe"}, Node: "probe", Provider: "probe", LeaseID: "probe"},
	}
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		c, err := adminInv.Create(ctx, probe)
		if apierrors.IsForbidden(err) {
			return nil
		}
		if err == nil {
			c.Finalizers = nil
			if _, err := adminInv.Update(ctx, c); err != nil {
				return err
			}
			if err := adminInv.Delete(ctx, c.Namespace, c.Name, metav1.DeleteOptions{}); err != nil {
				return err
			}
		}
	}
	return errors.New("the chart's policies are not in force after 30s")
}

// pluginOn makes a pod of the node plugin on node (and the node) and
// returns an inventory client with the token kubelet would mint for it:
// bound to the pod, so the API server knows its node.
func pluginOn(t *testing.T, node string) *inventory.Client {
	t.Helper()
	ctx := context.Background()
	if _, err := admin.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: node}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	pod, err := admin.CoreV1().Pods(pluginNamespace).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{GenerateName: "plugin-"},
		Spec: corev1.PodSpec{
			NodeName: node, ServiceAccountName: pluginAccount,
			Containers: []corev1.Container{{Name: "plugin", Image: "registry.k8s.io/pause:3.10"}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return accountClient(t, pluginAccount, &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID})
}

// accountToken is a token of a service account of the chart's namespace,
// bound to ref (nil: to nothing).
func accountToken(ctx context.Context, account string, ref *authenticationv1.BoundObjectReference) (string, error) {
	tr, err := admin.CoreV1().ServiceAccounts(pluginNamespace).CreateToken(ctx, account,
		&authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{BoundObjectRef: ref}}, metav1.CreateOptions{})
	if err != nil {
		return "", err
	}
	harness.RememberSecret(tr.Status.Token)
	return tr.Status.Token, nil
}

// accountClient is an inventory client as accountToken's.
func accountClient(t *testing.T, account string, ref *authenticationv1.BoundObjectReference) *inventory.Client {
	t.Helper()
	token, err := accountToken(context.Background(), account, ref)
	if err != nil {
		t.Fatal(err)
	}
	c, err := inventory.NewClient(as(token))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func ignoreExists[T any](_ T, err error) error {
	if apierrors.IsAlreadyExists(err) {
		return nil
	}
	return err
}

// TestNodePolicyConfinesAPluginToItsNode: with the chart's policy, the
// plugin of node a records, renews and releases its own node's records,
// and is refused for node b's, and for the issuer's finalizer.
func TestNodePolicyConfinesAPluginToItsNode(t *testing.T) {
	ns := namespace(t)
	ctx := context.Background()
	nodeA, nodeB := ns+"-a", ns+"-b"
	plugin := pluginOn(t, nodeA)
	pod := newPod(t, ns, "app")
	rec := inventory.NewNodeRecorder(plugin)

	// A user with the same rights but not the plugin's identity is not
	// confined (RBAC cannot do it): node b's record, written by it.
	forged := entryFor(pod, nodeB, ns+"-app-forged001")
	if err := inventory.NewNodeRecorder(nodeAInv).Issued(ctx, forged); err != nil {
		t.Fatalf("the RBAC alone: %v", err)
	}
	other := entryFor(pod, nodeB, ns+"-app-nodeb0001")
	if err := rec.Issued(ctx, other); err == nil || !strings.Contains(err.Error(), "only the credential records of its own node") {
		t.Errorf("a record of node b by node a: %v", err)
	}

	mine := entryFor(pod, nodeA, ns+"-app-nodea0001")
	if err := rec.Issued(ctx, mine); err != nil {
		t.Fatalf("node a's own record: %v", err)
	}
	mine.ExpiresAt = mine.ExpiresAt.Add(time.Hour)
	if err := rec.Issued(ctx, mine); err != nil {
		t.Fatalf("node a renews its own record: %v", err)
	}
	// Node b's record: no update, no delete.
	if err := rec.Revoked(ctx, forged); err == nil || !strings.Contains(err.Error(), "own node") {
		t.Errorf("node a releases node b's record: %v", err)
	}
	if err := plugin.Delete(ctx, ns, inventory.Name(forged.LeaseID), metav1.DeleteOptions{}); !apierrors.IsForbidden(err) && !apierrors.IsInvalid(err) {
		t.Errorf("node a deletes node b's record: %v", err)
	}
	// The issuer's record of a credential on node a: its finalizer stays.
	issued := entryFor(pod, nodeA, ns+"-app-issuer001")
	record(t, inventory.NewRecorder(issuerInv, nil), issued)
	c, err := plugin.Get(ctx, ns, inventory.Name(issued.LeaseID))
	if err != nil {
		t.Fatal(err)
	}
	c.Finalizers = nil
	if _, err := plugin.Update(ctx, c); err == nil || !strings.Contains(err.Error(), "issuer's finalizer") {
		t.Errorf("node a removes the issuer's finalizer: %v", err)
	}
	// Nor may it rewrite the issuer's account of that credential: its
	// state, its use, a foreign source (the evidence of a theft).
	if c, err = plugin.Get(ctx, ns, inventory.Name(issued.LeaseID)); err != nil {
		t.Fatal(err)
	}
	c.Status.State = v1alpha1.StateIssued
	c.Status.Sources = nil
	c.Status.SourcesSummary = "10.0.0.9"
	if _, err := plugin.UpdateStatus(ctx, c); err == nil || !strings.Contains(err.Error(), "holds the issuer's finalizer") {
		t.Errorf("node a rewrites the status of the issuer's record: %v", err)
	}
	c.Labels["extra"] = "x"
	if _, err := plugin.Update(ctx, c); err == nil || !strings.Contains(err.Error(), "holds the issuer's finalizer") {
		t.Errorf("node a relabels the issuer's record: %v", err)
	}
	// A token not bound to a pod names no node.
	unbound := accountClient(t, pluginAccount, nil)
	other.LeaseID = ns + "-app-unbound01"
	if err := inventory.NewNodeRecorder(unbound).Issued(ctx, other); err == nil || !strings.Contains(err.Error(), "names no node") {
		t.Errorf("an unbound token: %v", err)
	}
	// The plugin's identity watches its node's records.
	nw := inventory.NewNodeWatcher(plugin, nodeA, func(context.Context, string, string, string) error { return nil }, 0)
	wctx, stop := context.WithCancel(ctx)
	defer stop()
	go func() { _ = nw.Run(wctx) }()
	harness.Eventually(t, 10*time.Second, "the plugin's watcher synced", func() (bool, error) { return nw.HasSynced(), nil })
	// Node a lets its own record go.
	if err := rec.Revoked(ctx, mine); err != nil {
		t.Errorf("node a releases its own record: %v", err)
	}
	gone(t, ns, inventory.Name(mine.LeaseID))
	for _, e := range []string{forged.LeaseID, issued.LeaseID} {
		if err := inventory.NewRecorder(adminInv, nil).Dropped(ctx, e); err != nil {
			t.Error(err)
		}
	}
}

// TestOnlyTheIssuerPutsItsFinalizer: with the chart's policies, a record
// carrying the issuer's finalizer (one whose deletion makes the issuer
// drop a role by lease ID) can be written by the issuer alone, not by a
// node plugin, another identity with create rights, or a cluster admin.
func TestOnlyTheIssuerPutsItsFinalizer(t *testing.T) {
	ns := namespace(t)
	ctx := context.Background()
	pod := newPod(t, ns, "app")
	e := entryFor(pod, ns+"-a", ns+"-app-issuers01")
	for name, c := range map[string]*inventory.Client{"admin": adminInv, "a user with the issuer's rights": issuerUserInv} {
		err := inventory.NewRecorder(c, nil).Issuing(ctx, e)
		if err == nil || !strings.Contains(err.Error(), "only the issuer puts its finalizer") {
			t.Errorf("%s: %v", name, err)
		}
	}
	// A record without it, then the finalizer added: refused too.
	if err := inventory.NewNodeRecorder(adminInv).Issued(ctx, e); err != nil {
		t.Fatal(err)
	}
	c := get(t, ns, e.LeaseID)
	c.Finalizers = append(c.Finalizers, v1alpha1.FinalizerRevoke)
	if _, err := adminInv.Update(ctx, c); err == nil || !strings.Contains(err.Error(), "only the issuer") {
		t.Errorf("adding the issuer's finalizer: %v", err)
	}
	if err := inventory.NewNodeRecorder(adminInv).Revoked(ctx, e); err != nil {
		t.Fatal(err)
	}
	gone(t, ns, inventory.Name(e.LeaseID))
	// The issuer records, renews and drops.
	rec := inventory.NewRecorder(issuerInv, nil)
	record(t, rec, e)
	if err := rec.Dropped(ctx, e.LeaseID); err != nil {
		t.Fatal(err)
	}
	gone(t, ns, inventory.Name(e.LeaseID))
}

// TestOnlyTheIssuerWritesTombstones: with the chart's policies, a
// tombstone (which refuses a pod's volume every credential) is written by
// the issuer alone: an admin cannot forge one, a node plugin cannot turn
// its own record into one, nor delete or change one of its node; an
// admin may delete one (the volume may then be issued again).
func TestOnlyTheIssuerWritesTombstones(t *testing.T) {
	ns := namespace(t)
	ctx := context.Background()
	pod := newPod(t, ns, "app")
	nodeA := ns + "-a"
	plugin := pluginOn(t, nodeA)
	forged := &v1alpha1.Credential{
		ObjectMeta: metav1.ObjectMeta{Name: inventory.TombstoneName(string(pod.UID), "csi-forged"), Namespace: ns},
		Spec: v1alpha1.CredentialSpec{Pod: v1alpha1.PodReference{Name: pod.Name, UID: string(pod.UID)}, Node: nodeA,
			Provider: "postgres", LeaseID: ns + "-app-forged001", VolumeID: "csi-forged"},
	}
	// The policy is in force once the admin is refused (the first of the
	// chart's policies to be applied was waited for, not this one).
	harness.Eventually(t, 30*time.Second, "an admin refused a forged tombstone", func() (bool, error) {
		c, err := adminInv.Create(ctx, forged)
		if err == nil {
			return false, adminInv.Delete(ctx, ns, c.Name, metav1.DeleteOptions{})
		}
		return apierrors.IsForbidden(err) && strings.Contains(err.Error(), "only the issuer writes a tombstone"), nil
	})
	if _, err := plugin.Create(ctx, forged); !apierrors.IsForbidden(err) {
		t.Errorf("a node plugin creates a tombstone: %v", err)
	}
	// A node plugin's own record, made a tombstone through its status.
	rec := inventory.NewNodeRecorder(plugin)
	mine := entryFor(pod, nodeA, ns+"-app-nodea0001")
	mine.Provider = "vault"
	if err := rec.Issued(ctx, mine); err != nil {
		t.Fatal(err)
	}
	c := get(t, ns, mine.LeaseID)
	c.Status.State = v1alpha1.StateWithdrawn
	if _, err := plugin.UpdateStatus(ctx, c); err == nil || !strings.Contains(err.Error(), "only the issuer writes a tombstone") {
		t.Errorf("a node plugin makes its record a tombstone: %v", err)
	}
	if err := rec.Revoked(ctx, mine); err != nil {
		t.Fatal(err)
	}

	// A real one: the kill switch on an issuer's record of node a.
	rv := &revoker{}
	issuerRec := startIssuer(t, rv, fastRetries)
	killed := entryFor(pod, nodeA, ns+"-app-killed001")
	record(t, issuerRec, killed)
	if err := adminInv.Delete(ctx, ns, inventory.Name(killed.LeaseID), metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	gone(t, ns, inventory.Name(killed.LeaseID))
	name := inventory.TombstoneName(string(pod.UID), killed.VolumeID)
	tomb, err := plugin.Get(ctx, ns, name)
	if err != nil || !inventory.IsTombstone(tomb) {
		t.Fatalf("tombstone %v, %v", tomb, err)
	}
	if err := plugin.Delete(ctx, ns, name, metav1.DeleteOptions{}); !apierrors.IsForbidden(err) || !strings.Contains(err.Error(), "may not delete a tombstone") {
		t.Errorf("a node plugin deletes a tombstone of its node: %v", err)
	}
	tomb.Status.State = v1alpha1.StateIssued
	if _, err := plugin.UpdateStatus(ctx, tomb); !apierrors.IsForbidden(err) {
		t.Errorf("a node plugin revives a tombstone: %v", err)
	}
	if _, err := adminInv.UpdateStatus(ctx, tomb); !apierrors.IsForbidden(err) {
		t.Errorf("an admin revives a tombstone: %v", err)
	}
	if err := adminInv.Delete(ctx, ns, name, metav1.DeleteOptions{}); err != nil {
		t.Errorf("an admin deletes a tombstone: %v", err)
	}
	gone(t, ns, name)
}
