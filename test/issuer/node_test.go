package issuer

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/ephemeral-secrets/csi-driver/pkg/issuer/remote"
	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/issuertest"
	"github.com/ephemeral-secrets/csi-driver/test/kubelet"
)

const nodeClasses = `apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: orders-db
  namespace: shop
spec:
  provider: postgres
  parameters:
    connection: main
    role: app
`

// The node plugin ("serve") with --issuer-address and no admin
// credential: kubelet's publish gets a role through the issuer that the
// pod logs in with; the unpublish drops it through the issuer.
func TestServeThroughTheIssuer(t *testing.T) {
	startIssuers(t)
	ctx := context.Background()
	env, err := harness.NewEnv()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = env.Close() })
	const node = "test-node" // harness.Driver's --node-id
	dp, err := objs.Node(ctx, node)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := objs.Token(ctx, dp, remote.Audience)
	if err != nil {
		t.Fatal(err)
	}
	tokenFile, err := issuertest.WriteToken(env.Base, "issuer-token", tok)
	if err != nil {
		t.Fatal(err)
	}
	classes := filepath.Join(env.Base, "classes.yaml")
	if err := os.WriteFile(classes, []byte(nodeClasses), 0o600); err != nil {
		t.Fatal(err)
	}
	args := []string{"--classes-file", classes, "--kubeconfig", driverKubeconfig, "--audit-log", harness.LogPath("node-audit"),
		"--issuer-address", replicas["issuer-1"].URL(), "--issuer-token-file", tokenFile,
		"--issuer-ca-configmap", issuertest.IssuerNamespace + "/ephemeral-secrets-csi-issuer-ca"}

	// Beside an admin credential on the node, it does not start.
	bad := &harness.Driver{Bin: nodeBin, Env: env, LogFile: harness.LogPath("node-refused"), Args: append(args, "--backend-config", backends)}
	if err := bad.Start(ctx); err == nil || !strings.Contains(err.Error(), "admin credential belongs to the issuer") {
		bad.Stop()
		t.Fatalf("a node plugin with the admin configuration and an issuer: %v", err)
	}

	drv := &harness.Driver{Bin: nodeBin, Env: env, LogFile: harness.LogPath("node"), Args: args}
	k := startNode(t, drv)
	p := tenant(t, "orders-csi", node)
	pod := kubelet.Pod{Namespace: p.Namespace, Name: p.Name, UID: p.UID, ServiceAccount: p.ServiceAccount}
	vol := kubelet.Volume{Name: issuertest.VolumeName, ReadOnly: true, Attributes: map[string]string{"secretProviderClass": "orders-db"}}
	target, err := k.Publish(ctx, pod, vol)
	if err != nil {
		t.Fatalf("publish: %v", err)
	}
	read := func(name string) string {
		b, err := os.ReadFile(filepath.Join(target, name))
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	user, password := read("username"), read("password")
	harness.RememberSecret(password)
	conn, err := pgx.Connect(ctx, pg.URL(user, password))
	if err != nil {
		t.Fatalf("the pod cannot log in: %v", err)
	}
	conn.Close(ctx)
	if err := k.Unpublish(ctx, pod, vol.Name); err != nil {
		t.Fatal(err)
	}
	harness.Eventually(t, 30*time.Second, "the role dropped", func() (bool, error) {
		ok, err := pg.RoleExists(ctx, user)
		return !ok, err
	})
}

// startNode starts the node plugin drv, stopped when t ends (its log
// tail shown if t failed), and dials it as kubelet.
func startNode(t *testing.T, drv *harness.Driver) *kubelet.Kubelet {
	t.Helper()
	if err := drv.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		drv.Stop()
		if t.Failed() {
			t.Logf("driver log:\n%s", drv.LogTail(4000))
		}
	})
	k, err := kubelet.Dial(drv.Env.Endpoint(), drv.Env.KubeletDir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = k.Close() })
	return k
}
