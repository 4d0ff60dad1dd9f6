package cluster

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/kubelet"
	"github.com/ephemeral-secrets/csi-driver/test/vaulttest"
)

// Vault's kubernetes auth method checks the pod's real TokenRequest token
// with the real API server's TokenReview; a token for another audience is
// refused.
func TestVaultKubernetesAuthWithRealTokens(t *testing.T) {
	ctx := context.Background()
	v, err := vaulttest.Start()
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	harness.RegisterLog(v.LogFile)
	if err := v.Setup(ctx, pg.AdminURL(), "team-v", "agent", time.Minute, time.Hour); err != nil {
		t.Fatal(err)
	}
	// The reviewer: a service account Vault uses for TokenReview.
	if _, err := clients.CoreV1().ServiceAccounts("ephemeral-secrets").Create(ctx,
		&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "vault-reviewer"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := clients.RbacV1().ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "vault-reviewer"},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: "system:auth-delegator"},
		Subjects:   []rbacv1.Subject{{Kind: "ServiceAccount", Name: "vault-reviewer", Namespace: "ephemeral-secrets"}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	rt := saToken(t, "ephemeral-secrets", "vault-reviewer")
	if err := v.SetupKubernetesAuth(ctx, cluster.URL, cluster.CAPEM, rt, "team-v", "agent"); err != nil {
		t.Fatal(err)
	}

	uids := namespace(t, "team-v", "agent", "agent-pod", "wrong-aud")
	createClassOf(t, "team-v", "vault-kv", "vault", map[string]any{
		"vaultAddress": v.Addr, "roleName": "k8s-app",
		"objects": "- objectName: api-key\n  secretPath: secret/data/app\n  secretKey: api-key\n",
	})
	f := setupWith(t, "vault:\n  addresses: [\""+v.Addr+"\"]\n")
	pod := podFor(t, "team-v", "agent-pod", "agent", uids["agent-pod"])
	target, err := f.kube.Publish(ctx, pod, volume("vault-kv"))
	if err != nil {
		t.Fatalf("publish with the kubernetes auth method: %v", err)
	}
	key, err := os.ReadFile(filepath.Join(target, "api-key"))
	if err != nil {
		t.Fatal(err)
	}
	harness.RememberSecret(string(key))
	if !strings.HasPrefix(string(key), "kv-api-key-") {
		t.Errorf("api-key holds %q", key)
	}
	if err := f.kube.Unpublish(ctx, pod, "db"); err != nil {
		t.Fatal(err)
	}

	tr := saToken(t, "team-v", "agent", "sts.amazonaws.com")
	wrong := kubelet.Pod{Namespace: "team-v", Name: "wrong-aud", UID: uids["wrong-aud"], ServiceAccount: "agent",
		Tokens: map[string]string{"vault": tr}}
	if _, err := f.kube.Publish(ctx, wrong, volume("vault-kv")); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("a token for another audience: %v, want PermissionDenied", err)
	}
}
