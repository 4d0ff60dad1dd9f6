package inventory_test

import (
	"context"
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

	"github.com/ephemeral-secrets/csi-driver/pkg/inventory"
	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/kube"
)

// The node plugin's service account as the chart names it.
const (
	pluginNamespace = "ephemeral-secrets"
	pluginAccount   = "ephemeral-secrets-csi"
)

// applyNodePolicy renders the chart's policy file for the plugin's
// service account (as the chart's tpl does) and applies it.
func applyNodePolicy(t *testing.T) {
	t.Helper()
	path := filepath.Join(repoRoot, "deploy/helm/ephemeral-secrets-csi/files/inventory-node-policy.yaml")
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	doc := strings.NewReplacer(`{{ .Release.Namespace }}`, pluginNamespace, `{{ include "esc.fullname" . }}`, pluginAccount).Replace(string(raw))
	if strings.Contains(doc, "{{") {
		t.Fatalf("%s has template expressions the test does not render", path)
	}
	ctx := context.Background()
	if err := kube.Apply(ctx, cluster.Config(), []byte(doc), false); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = kube.Delete(ctx, cluster.Config(), []byte(doc)) })
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
	return pluginClient(t, &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID})
}

// pluginClient is an inventory client with a token of the plugin's
// service account, bound to ref (nil: to nothing).
func pluginClient(t *testing.T, ref *authenticationv1.BoundObjectReference) *inventory.Client {
	t.Helper()
	tr, err := admin.CoreV1().ServiceAccounts(pluginNamespace).CreateToken(context.Background(), pluginAccount,
		&authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{BoundObjectRef: ref}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	harness.RememberSecret(tr.Status.Token)
	c, err := inventory.NewClient(as(tr.Status.Token))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// pluginAccountOnce creates the plugin's namespace, service account and
// the chart's node role bound to it.
func pluginAccountOnce(t *testing.T) {
	t.Helper()
	ctx := context.Background()
	for _, err := range []error{
		ignoreExists(admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: pluginNamespace}}, metav1.CreateOptions{})),
		ignoreExists(admin.CoreV1().ServiceAccounts(pluginNamespace).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: pluginAccount}}, metav1.CreateOptions{})),
		ignoreExists(admin.RbacV1().ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{
			ObjectMeta: metav1.ObjectMeta{Name: "esc-test-plugin-inventory"},
			RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: "ephemeral-secrets-csi-node-inventory"},
			Subjects:   []rbacv1.Subject{{Kind: "ServiceAccount", Namespace: pluginNamespace, Name: pluginAccount}},
		}, metav1.CreateOptions{})),
	} {
		if err != nil {
			t.Fatal(err)
		}
	}
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
	pluginAccountOnce(t)
	ns := namespace(t)
	ctx := context.Background()
	nodeA, nodeB := ns+"-a", ns+"-b"
	plugin := pluginOn(t, nodeA)
	pod := newPod(t, ns, "app")
	rec := inventory.NewNodeRecorder(plugin)

	// Before the policy: the RBAC alone lets node a write node b's record.
	forged := entryFor(pod, nodeB, ns+"-app-forged001")
	if err := rec.Issued(ctx, forged); err != nil {
		t.Fatalf("without the policy: %v", err)
	}
	applyNodePolicy(t)
	other := entryFor(pod, nodeB, ns+"-app-nodeb0001")
	harness.Eventually(t, 30*time.Second, "the policy refuses node b's record to node a", func() (bool, error) {
		err := rec.Issued(ctx, other)
		return apierrors.IsForbidden(err) || apierrors.IsInvalid(err), nil
	})
	err := rec.Issued(ctx, other)
	if err == nil || !strings.Contains(err.Error(), "only the credential records of its own node") {
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
	// Node b's record (written before the policy): no update, no delete.
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
	// A token not bound to a pod names no node.
	unbound := pluginClient(t, nil)
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
