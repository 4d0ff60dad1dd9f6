package cluster

import (
	"context"
	"os"
	"slices"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ephemeral-secrets/csi-driver/pkg/apis/ephemeralsecrets/v1alpha1"
	"github.com/ephemeral-secrets/csi-driver/pkg/inventory"
	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/kubelet"
	"github.com/ephemeral-secrets/csi-driver/test/vaulttest"
)

// The node plugin records the Vault leases it revokes itself: a
// Credential held by the node's finalizer while the lease lives, gone
// once the revocation is confirmed; deleting it (the kill switch)
// revokes the lease and empties the volume.
func TestVaultCredentialRecordedByTheNode(t *testing.T) {
	ctx := context.Background()
	v, err := vaulttest.Start()
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	harness.RegisterLog(v.LogFile)
	if err := pg.Exec(ctx, `CREATE TABLE IF NOT EXISTS public.items (id int)`); err != nil {
		t.Fatal(err)
	}
	if err := v.Setup(ctx, pg.AdminURL(), "team-rec", "agent", time.Hour, 2*time.Hour); err != nil {
		t.Fatal(err)
	}
	root, err := v.Client()
	if err != nil {
		t.Fatal(err)
	}
	uids := namespace(t, "team-rec", "agent", "p1", "p2")
	createClassOf(t, "team-rec", "vault-kv", "vault", map[string]any{
		"vaultAddress": v.Addr, "roleName": "app", "vaultAuthMountPath": "jwt",
		"objects": "- objectName: api-key\n  secretPath: secret/data/app\n  secretKey: api-key\n",
	})
	f := setupWith(t, "vault:\n  addresses: [\""+v.Addr+"\"]\n")
	inv, err := inventory.NewClient(cluster.Config())
	if err != nil {
		t.Fatal(err)
	}
	// appTokens counts the live Vault tokens of the pods' logins.
	appTokens := func() int {
		s, err := root.Logical().ListWithContext(ctx, "auth/token/accessors")
		if err != nil || s == nil {
			t.Fatalf("listing tokens: %v", err)
		}
		keys, _ := s.Data["keys"].([]any)
		n := 0
		for _, k := range keys {
			acc, _ := k.(string)
			l, err := root.Auth().Token().LookupAccessorWithContext(ctx, acc)
			if err != nil || l == nil {
				continue
			}
			if ps, err := l.TokenPolicies(); err == nil && slices.Contains(ps, "app") {
				n++
			}
		}
		return n
	}
	pod := func(name string) kubelet.Pod {
		jwt, err := v.Token("team-rec", "agent", "vault")
		if err != nil {
			t.Fatal(err)
		}
		harness.RememberSecret(jwt)
		return kubelet.Pod{Namespace: "team-rec", Name: name, UID: uids[name], ServiceAccount: "agent",
			Tokens: map[string]string{"vault": jwt}}
	}
	// recordOf waits for the pod's record in state Issued and checks it.
	recordOf := func(p kubelet.Pod) *v1alpha1.Credential {
		var cred *v1alpha1.Credential
		harness.Eventually(t, 30*time.Second, "the Credential of "+p.Name, func() (bool, error) {
			l, err := inv.List(ctx, p.Namespace, metav1.ListOptions{LabelSelector: v1alpha1.LabelPodUID + "=" + p.UID})
			if err != nil || len(l.Items) != 1 || l.Items[0].Status.State != v1alpha1.StateIssued {
				return false, err
			}
			cred = &l.Items[0]
			return true, nil
		})
		if cred.Spec.Provider != "vault" || !slices.Contains(cred.Finalizers, v1alpha1.FinalizerNodeRevoke) ||
			cred.Spec.Pod.Name != p.Name || cred.Spec.VolumeID == "" || cred.Spec.Node == "" ||
			cred.Status.ExpiresAt == nil || cred.Status.ExpiresAt.Time.Before(time.Now()) {
			t.Fatalf("record %s: provider %q, finalizers %v, pod %q, volume %q, node %q, expires %v", cred.Name,
				cred.Spec.Provider, cred.Finalizers, cred.Spec.Pod.Name, cred.Spec.VolumeID, cred.Spec.Node, cred.Status.ExpiresAt)
		}
		return cred
	}
	recordGone := func(c *v1alpha1.Credential, when string) {
		harness.Eventually(t, 30*time.Second, "the record to go "+when, func() (bool, error) {
			_, err := inv.Get(ctx, c.Namespace, c.Name)
			if apierrors.IsNotFound(err) {
				return true, nil
			}
			return false, err
		})
	}

	// Unpublish: the revocation confirmed, then the record goes.
	p1 := pod("p1")
	if _, err := f.kube.Publish(ctx, p1, volume("vault-kv")); err != nil {
		t.Fatal(err)
	}
	c1 := recordOf(p1)
	if n := appTokens(); n != 1 {
		t.Fatalf("%d live pod tokens, want 1", n)
	}
	if err := f.kube.Unpublish(ctx, p1, "db"); err != nil {
		t.Fatal(err)
	}
	recordGone(c1, "after the unpublish")
	if n := appTokens(); n != 0 {
		t.Fatalf("%d live pod tokens after the unpublish", n)
	}

	// The kill switch: the lease revoked, the files emptied, the record
	// gone, while the pod keeps its (empty) volume.
	p2 := pod("p2")
	target, err := f.kube.Publish(ctx, p2, volume("vault-kv"))
	if err != nil {
		t.Fatal(err)
	}
	c2 := recordOf(p2)
	if err := inv.Delete(ctx, c2.Namespace, c2.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	recordGone(c2, "after the kill switch")
	if n := appTokens(); n != 0 {
		t.Fatalf("%d live pod tokens after the kill switch", n)
	}
	entries, err := os.ReadDir(target)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 0 {
		t.Fatalf("the killed volume still shows %d files", len(entries))
	}
	if err := f.kube.Unpublish(ctx, p2, "db"); err != nil {
		t.Fatal(err)
	}
}
