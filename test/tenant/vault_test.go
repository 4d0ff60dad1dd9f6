package tenant

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/kubelet"
	"github.com/ephemeral-secrets/csi-driver/test/vaulttest"
)

// vaultTokens counts Vault's live tokens (the root token included).
func vaultTokens(t *testing.T, v *vaulttest.Server) int {
	t.Helper()
	cl, err := v.Client()
	if err != nil {
		t.Fatal(err)
	}
	s, err := cl.Logical().ListWithContext(context.Background(), "auth/token/accessors")
	if err != nil {
		t.Fatal(err)
	}
	if s == nil {
		return 0
	}
	keys, _ := s.Data["keys"].([]any)
	return len(keys)
}

// vaultRoles counts the PostgreSQL roles Vault's database engine made.
func vaultRoles(t *testing.T) int {
	t.Helper()
	n, err := pg.CountRoles(context.Background(), "v-")
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// vaultPod is a pod of team-a/app with a token the real Vault accepts.
func vaultPod(t *testing.T, v *vaulttest.Server, name string) kubelet.Pod {
	t.Helper()
	p := kubelet.NewPod("team-a", name, "app")
	tok, err := v.Token("team-a", "app", "vault")
	if err != nil {
		t.Fatal(err)
	}
	sts, err := v.Token("team-a", "app", "sts.amazonaws.com")
	if err != nil {
		t.Fatal(err)
	}
	p.Tokens = map[string]string{"vault": tok, "sts.amazonaws.com": sts}
	harness.RememberSecret(tok)
	harness.RememberSecret(sts)
	return p
}

// Against a real Vault: a hostile class or pod is refused without a login
// (Vault's tokens unchanged), and one whose template fails after the login
// leaves no live token and no database role behind.
func TestHostileClassesAgainstRealVault(t *testing.T) {
	ctx := context.Background()
	v := realVault(t)
	env := newEnv(t)
	objects := "- {objectName: username, secretPath: database/creds/app, secretKey: username}\n" +
		"- {objectName: password, secretPath: database/creds/app, secretKey: password}"
	params := func(extra map[string]string) map[string]string {
		p := map[string]string{"vaultAddress": v.Addr, "roleName": "app", "vaultAuthMountPath": "jwt", "objects": objects}
		for k, val := range extra {
			p[k] = val
		}
		return p
	}
	classes := strings.Join([]string{
		class("team-a", "good", "vault", params(nil)),
		class("team-a", "audience", "vault", params(map[string]string{"audience": "sts.amazonaws.com"})),
		class("team-a", "skip", "vault", params(map[string]string{"vaultSkipTLSVerify": "true"})),
		class("team-a", "spin", "vault", params(map[string]string{"files": "- {path: x, template: '{{range 100000}}{{range 100000}}{{end}}{{end}}'}"})),
		class("team-a", "bloat", "vault", params(map[string]string{"files": "- {path: x, template: '" +
			`{{$a := printf "%s%s" .password .password}}` + strings.Repeat(`{{$a = printf "%s%s" $a $a}}`, 40) + `{{$a}}'}`})),
	}, "---\n")
	f := start(t, env, classes, fmt.Sprintf("vault:\n  addresses: [%q]\n", v.Addr))
	tokens0, roles0 := vaultTokens(t, v), vaultRoles(t)

	// The control: a good class logs in, and its unpublish revokes the token
	// and the database role: the counts can move, and come back.
	good := vaultPod(t, v, "good")
	if _, err := f.kube.Publish(ctx, good, volume("good")); err != nil {
		t.Fatal(err)
	}
	if vaultTokens(t, v) != tokens0+1 || vaultRoles(t) != roles0+1 {
		t.Fatalf("a good publish: %d tokens, %d roles; before %d, %d", vaultTokens(t, v), vaultRoles(t), tokens0, roles0)
	}
	if err := f.kube.Unpublish(ctx, good, "secrets"); err != nil {
		t.Fatal(err)
	}
	harness.Eventually(t, 15*time.Second, "the good pod's token and role revoked", func() (bool, error) {
		return vaultTokens(t, v) == tokens0 && vaultRoles(t) == roles0, nil
	})

	forged, err := v.Token("team-a", "app", "vault") // a valid token, but the pod's own choice
	if err != nil {
		t.Fatal(err)
	}
	harness.RememberSecret(forged)
	for _, tc := range []struct {
		name, class string
		pod         func(*kubelet.Pod, *kubelet.Volume)
		code        codes.Code
		loggedIn    bool // the failure comes after the login: its token is revoked
	}{
		{"class chooses the STS audience", "audience", nil, codes.InvalidArgument, false},
		{"class skips verification", "skip", nil, codes.InvalidArgument, false},
		{"pod supplies its token", "good", setPodAttr("csi.storage.k8s.io/serviceAccount.tokens",
			`{"vault":{"token":"`+forged+`","expirationTimestamp":"2030-01-01T00:00:00Z"}}`), codes.InvalidArgument, false},
		{"template spins after the login", "spin", nil, codes.InvalidArgument, true},
		{"template bloats after the login", "bloat", nil, codes.ResourceExhausted, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := vaultPod(t, v, "hostile-"+tc.class)
			vol := volume(tc.class)
			if tc.pod != nil {
				tc.pod(&p, &vol)
			}
			_, err := f.kube.Publish(ctx, p, vol)
			if status.Code(err) != tc.code {
				t.Fatalf("code %s (%v), want %s", status.Code(err), err, tc.code)
			}
			harness.Eventually(t, 15*time.Second, "no live Vault token or database role left", func() (bool, error) {
				return vaultTokens(t, v) == tokens0 && vaultRoles(t) == roles0, nil
			})
			assertNothingLeft(t, f, p)
			if revoked := revokedFor(t, f, p); revoked != tc.loggedIn {
				t.Errorf("a revocation recorded: %v, want %v (a refusal before the login has nothing to revoke)", revoked, tc.loggedIn)
			}
		})
	}
}

// revokedFor reports whether the audit log records a successful
// revocation for the pod: its Vault token existed, and is gone.
func revokedFor(t *testing.T, f *fixture, p kubelet.Pod) bool {
	t.Helper()
	data, err := os.ReadFile(f.audit)
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		var r struct {
			Stage   string `json:"stage"`
			Outcome string `json:"outcome"`
			Pod     struct {
				UID string `json:"uid"`
			} `json:"pod"`
		}
		if json.Unmarshal([]byte(line), &r) == nil && r.Pod.UID == p.UID && r.Stage == "revoke" && r.Outcome == "success" {
			return true
		}
	}
	return false
}
