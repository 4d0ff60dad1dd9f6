package vault

import (
	"errors"
	"testing"

	api "github.com/openbao/openbao/api/v2"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// The parameters of hashicorp/vault-csi-provider's documented examples parse.
func TestParseCSIProviderParameters(t *testing.T) {
	c, err := parseParams(map[string]string{
		"vaultAddress":             "https://vault.vault:8200",
		"roleName":                 "database",
		"vaultKubernetesMountPath": "kubernetes-custom",
		"vaultCACertPath":          "/vault/tls/ca.crt",
		"vaultSkipTLSVerify":       "false",
		"objects": `
- objectName: "db-password"
  secretPath: "database/creds/db-app"
  secretKey: "password"
- objectName: "cert"
  secretPath: "pki/issue/example-dot-com"
  method: "PUT"
  secretArgs:
    common_name: "test.example.com"
  encoding: "base64"
`,
	})
	if err != nil {
		t.Fatal(err)
	}
	if c.authMount != "kubernetes-custom" || c.audience != "" || len(c.files) != 1 || c.skipVerify != "false" || c.address != "https://vault.vault:8200" || len(c.objects) != 2 {
		t.Fatalf("%+v", c)
	}
	if c.objects[1].SecretArgs["common_name"] != "test.example.com" || c.objects[1].Method != "PUT" {
		t.Fatalf("%+v", c.objects[1])
	}
}

func TestParseParamsRejects(t *testing.T) {
	objs := `- {objectName: a, secretPath: secret/data/a}`
	for name, p := range map[string]map[string]string{
		"no role":         {"objects": objs},
		"no objects":      {"roleName": "r"},
		"unknown param":   {"roleName": "r", "objects": objs, "vaultToken": "s.x"},
		"duplicate":       {"roleName": "r", "objects": objs + "\n" + objs},
		"bad method":      {"roleName": "r", "objects": `- {objectName: a, secretPath: p, method: DELETE}`},
		"bad encoding":    {"roleName": "r", "objects": `- {objectName: a, secretPath: p, encoding: rot13}`},
		"no path":         {"roleName": "r", "objects": `- {objectName: a}`},
		"bad renewBefore": {"roleName": "r", "objects": objs, "renewBefore": "soon"},
		"mount dot-dot":   {"roleName": "r", "objects": objs, "vaultAuthMountPath": "kubernetes/../../sys"},
		"path dot-dot":    {"roleName": "r", "objects": `- {objectName: a, secretPath: secret/../sys/policies/acl/root}`},
	} {
		if _, err := parseParams(p); !errors.Is(err, provider.ErrInvalidParameters) {
			t.Errorf("%s: %v", name, err)
		}
	}
}

func TestValueFollowsCSIProvider(t *testing.T) {
	kv2 := &api.Secret{Data: map[string]any{"data": map[string]any{"password": "p", "n": 3.0}, "metadata": map[string]any{"version": 2.0}}}
	plain := &api.Secret{Data: map[string]any{"username": "u", "blob": "aGVsbG8="}}
	for _, tc := range []struct {
		s    *api.Secret
		o    Object
		want string
	}{
		{kv2, Object{SecretKey: "password"}, "p"},
		{kv2, Object{SecretKey: "n"}, "3"},
		{plain, Object{SecretKey: "username"}, "u"},
		{plain, Object{SecretKey: "blob", Encoding: "base64"}, "hello"},
		{plain, Object{}, `{"blob":"aGVsbG8=","username":"u"}`},
	} {
		got, err := value(tc.s, tc.o)
		if err != nil || got != tc.want {
			t.Errorf("value(%v, %+v) = %q, %v; want %q", tc.s.Data, tc.o, got, err, tc.want)
		}
	}
	if _, err := value(plain, Object{SecretKey: "nope"}); !errors.Is(err, provider.ErrNotFound) {
		t.Errorf("missing key: %v", err)
	}
}

func TestObjectsOfOnePathShareARequest(t *testing.T) {
	a := Object{ObjectName: "u", SecretPath: "database/creds/app", SecretKey: "username"}
	b := Object{ObjectName: "p", SecretPath: "database/creds/app", SecretKey: "password", Method: "GET"}
	c := Object{ObjectName: "c", SecretPath: "pki/issue/x", Method: "PUT", SecretArgs: map[string]any{"common_name": "a"}}
	d := Object{ObjectName: "d", SecretPath: "pki/issue/x", Method: "PUT", SecretArgs: map[string]any{"common_name": "b"}}
	if requestKey(a) != requestKey(b) {
		t.Error("two keys of one path make two requests")
	}
	if requestKey(c) == requestKey(d) {
		t.Error("different arguments share a request")
	}
}
