package spc

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/yaml"
)

const uid = "0b9e2f36-6a7c-4d3e-9f4e-3a1c2b5d6e7f"

func kubeletContext() map[string]string {
	return map[string]string{
		ClassKey: "db", PodNameKey: "web-0", PodNamespaceKey: "shop", PodUIDKey: uid,
		ServiceAccountKey: "web", EphemeralKey: "true",
		TokensKey: `{"vault":{"token":"SECRET-TOKEN-VALUE","expirationTimestamp":"2030-01-01T00:00:00Z"}}`,
	}
}

func TestParseVolumeContext(t *testing.T) {
	m, err := ParseVolumeContext(kubeletContext(), nil, TokensFromVolumeContext)
	if err != nil {
		t.Fatal(err)
	}
	if m.Class != "db" || m.Pod.Namespace != "shop" || m.Pod.Name != "web-0" || m.Pod.ServiceAccount != "web" || m.Pod.UID != uid {
		t.Fatalf("parsed %+v", m)
	}
	if m.Tokens["vault"].Token != "SECRET-TOKEN-VALUE" || !m.Tokens["vault"].ExpiresAt.Equal(time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)) {
		t.Fatalf("tokens %+v", m.Tokens)
	}
	// serviceAccountTokenInSecrets: the tokens come in secrets instead.
	vc := kubeletContext()
	secrets := map[string]string{TokensKey: vc[TokensKey]}
	delete(vc, TokensKey)
	if m, err := ParseVolumeContext(vc, secrets, TokensFromSecrets); err != nil || m.Tokens["vault"].Token != "SECRET-TOKEN-VALUE" {
		t.Fatalf("tokens from secrets: %+v %v", m.Tokens, err)
	}
}

// A token the pod supplies (in its volumeAttributes, or in a Secret its
// nodePublishSecretRef names) is refused, whichever place kubelet uses.
func TestPodCannotSupplyItsToken(t *testing.T) {
	forged := `{"vault":{"token":"SECRET-FORGED-TOKEN"}}`
	vc := kubeletContext() // a pod's attribute, kubelet's tokens in secrets
	secrets := map[string]string{TokensKey: vc[TokensKey]}
	vc[TokensKey] = forged
	if _, err := ParseVolumeContext(vc, secrets, TokensFromSecrets); !errors.Is(err, ErrInvalidContext) || strings.Contains(err.Error(), "SECRET-") {
		t.Errorf("token in the pod's attributes: %v", err)
	}
	delete(secrets, TokensKey) // no tokenRequests: only the pod's
	if _, err := ParseVolumeContext(vc, secrets, TokensFromSecrets); !errors.Is(err, ErrInvalidContext) {
		t.Errorf("token only in the pod's attributes: %v", err)
	}
	vc = kubeletContext() // kubelet's in the context, the pod's Secret in secrets
	if _, err := ParseVolumeContext(vc, map[string]string{TokensKey: forged}, TokensFromVolumeContext); !errors.Is(err, ErrInvalidContext) {
		t.Errorf("token in a nodePublishSecretRef: %v", err)
	}
}

func TestParseVolumeContextRejects(t *testing.T) {
	for name, mutate := range map[string]func(map[string]string){
		"reserved key":      func(vc map[string]string) { vc["csi.storage.k8s.io/pod.role"] = "admin" },
		"unknown attribute": func(vc map[string]string) { vc["ttl"] = "999h" },
		"no class":          func(vc map[string]string) { delete(vc, ClassKey) },
		"bad class name":    func(vc map[string]string) { vc[ClassKey] = "../db" },
		"no namespace":      func(vc map[string]string) { delete(vc, PodNamespaceKey) },
		"no pod name":       func(vc map[string]string) { delete(vc, PodNameKey) },
		"no uid":            func(vc map[string]string) { delete(vc, PodUIDKey) },
		"bad uid":           func(vc map[string]string) { vc[PodUIDKey] = "../../x" },
		"no sa":             func(vc map[string]string) { delete(vc, ServiceAccountKey) },
		"bad ephemeral":     func(vc map[string]string) { vc[EphemeralKey] = "maybe" },
		"bad tokens":        func(vc map[string]string) { vc[TokensKey] = `{"vault":"SECRET-TOKEN-VALUE"` },
	} {
		vc := kubeletContext()
		mutate(vc)
		_, err := ParseVolumeContext(vc, nil, TokensFromVolumeContext)
		if !errors.Is(err, ErrInvalidContext) {
			t.Errorf("%s: %v, want ErrInvalidContext", name, err)
		}
		if err != nil && strings.Contains(err.Error(), "SECRET-TOKEN") {
			t.Errorf("%s: error quotes the token: %v", name, err)
		}
	}
}

// FuzzParseVolumeContext: never panics, never quotes the tokens in an
// error, and what it accepts is well-formed.
func FuzzParseVolumeContext(f *testing.F) {
	f.Add("db", "shop", "web-0", uid, "web", `{"a":{"token":"SECRET-x"}}`, "extra", "v")
	f.Add("db", "shop", "web-0", uid, "web", `{"a":"SECRET-x"`, "csi.storage.k8s.io/x", "v")
	f.Add("", "", "", "", "", "", "", "")
	f.Fuzz(func(t *testing.T, class, ns, name, podUID, sa, tokens, k, v string) {
		vc := map[string]string{ClassKey: class, PodNamespaceKey: ns, PodNameKey: name, PodUIDKey: podUID,
			ServiceAccountKey: sa, TokensKey: tokens}
		if k != "" {
			vc[k] = v
		}
		m, err := ParseVolumeContext(vc, nil, TokensFromVolumeContext)
		if err != nil {
			if len(tokens) > 8 && strings.Contains(err.Error(), tokens) {
				t.Fatalf("error quotes the tokens: %v", err)
			}
			return
		}
		for _, s := range []string{m.Class, m.Pod.Namespace, m.Pod.Name, m.Pod.ServiceAccount, m.Pod.UID} {
			if s == "" || strings.ContainsAny(s, "/\\\x00") || s == ".." {
				t.Fatalf("accepted unsafe name %q", s)
			}
		}
	})
}

const classDocs = `# comment
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: db
  namespace: shop
spec:
  provider: postgres
  parameters:
    role: reader
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: unrelated
---
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: nons
spec:
  provider: vault
`

func TestFileResolver(t *testing.T) {
	path := filepath.Join(t.TempDir(), "classes.yaml")
	if err := os.WriteFile(path, []byte(classDocs), 0o600); err != nil {
		t.Fatal(err)
	}
	r, err := NewFileResolver(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	c, err := r.Resolve(ctx, "shop", "db")
	if err != nil || c.Provider != "postgres" || c.Parameters["role"] != "reader" || c.Ref() != "shop/db" {
		t.Fatalf("shop/db: %+v %v", c, err)
	}
	if _, err := r.Resolve(ctx, "other", "db"); !errors.Is(err, ErrClassNotFound) {
		t.Fatalf("class from another namespace: %v", err)
	}
	if c, err := r.Resolve(ctx, "default", "nons"); err != nil || c.Provider != "vault" {
		t.Fatalf("default namespace: %+v %v", c, err)
	}
	// An edit is seen without a restart.
	updated := strings.Replace(classDocs, "role: reader", "role: writer", 1) + "\n"
	if err := os.WriteFile(path, []byte(updated), 0o600); err != nil {
		t.Fatal(err)
	}
	if c, err := r.Resolve(ctx, "shop", "db"); err != nil || c.Parameters["role"] != "writer" {
		t.Fatalf("after edit: %+v %v", c, err)
	}
}

func TestParseClassesRejects(t *testing.T) {
	for name, doc := range map[string]string{
		"no provider": "apiVersion: secrets-store.csi.x-k8s.io/v1\nkind: SecretProviderClass\nmetadata: {name: a}\nspec: {}\n",
		"bad name":    "apiVersion: secrets-store.csi.x-k8s.io/v1\nkind: SecretProviderClass\nmetadata: {name: A/b}\nspec: {provider: x}\n",
		"duplicate":   "apiVersion: secrets-store.csi.x-k8s.io/v1\nkind: SecretProviderClass\nmetadata: {name: a}\nspec: {provider: x}\n---\napiVersion: secrets-store.csi.x-k8s.io/v1\nkind: SecretProviderClass\nmetadata: {name: a}\nspec: {provider: x}\n",
		"not yaml":    "apiVersion: [",
	} {
		if _, err := ParseClasses([]byte(doc)); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func FuzzParseClasses(f *testing.F) {
	f.Add([]byte(classDocs))
	f.Add([]byte("---\n---\n"))
	f.Add([]byte("apiVersion: secrets-store.csi.x-k8s.io/v1\nkind: SecretProviderClass\nmetadata: {name: a, namespace: b}\nspec: {provider: x, parameters: {k: v}}\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		classes, err := ParseClasses(data)
		if err != nil {
			return
		}
		for key, c := range classes {
			if key != c.Namespace+"/"+c.Name || ValidateObjectName(c.Name) != nil || ValidateObjectName(c.Namespace) != nil || c.Provider == "" {
				t.Fatalf("accepted malformed class %q: %+v", key, c)
			}
		}
	})
}

const withSecretObjects = `apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: synced
  namespace: shop
spec:
  provider: postgres
  parameters:
    role: reader
  secretObjects:
    - secretName: db-creds
      type: Opaque
      data:
        - objectName: password
          key: password
`

// assertSecretObjectsRefused checks the refusal is an invalid class that
// says why, so the driver answers InvalidArgument.
func assertSecretObjectsRefused(t *testing.T, c *Class, err error) {
	t.Helper()
	if !errors.Is(err, ErrInvalidContext) || c != nil {
		t.Fatalf("class with secretObjects: %+v %v, want ErrInvalidContext", c, err)
	}
	for _, want := range []string{"shop/synced", "secretObjects", "never writes Kubernetes Secrets", "etcd"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("refusal %q does not say %q", err, want)
		}
	}
}

func TestFileResolverRefusesSecretObjects(t *testing.T) {
	path := filepath.Join(t.TempDir(), "classes.yaml")
	if err := os.WriteFile(path, []byte(classDocs+"---\n"+withSecretObjects), 0o600); err != nil {
		t.Fatal(err)
	}
	r, err := NewFileResolver(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	c, err := r.Resolve(ctx, "shop", "synced")
	assertSecretObjectsRefused(t, c, err)
	// The file's other classes stay usable, and an empty list is no sync.
	if c, err := r.Resolve(ctx, "shop", "db"); err != nil || c.Provider != "postgres" {
		t.Fatalf("shop/db next to a refused class: %+v %v", c, err)
	}
	empty := strings.Split(withSecretObjects, "  secretObjects:")[0] + "  secretObjects: []\n"
	if err := os.WriteFile(path, []byte(empty), 0o600); err != nil {
		t.Fatal(err)
	}
	if c, err := r.Resolve(ctx, "shop", "synced"); err != nil || c.Provider != "postgres" {
		t.Fatalf("empty secretObjects: %+v %v", c, err)
	}
}

func TestKubeClassRefusesSecretObjects(t *testing.T) {
	var u unstructured.Unstructured
	if err := yaml.Unmarshal([]byte(withSecretObjects), &u.Object); err != nil {
		t.Fatal(err)
	}
	c, err := classFrom(&u)
	assertSecretObjectsRefused(t, c, err)

	if err := unstructured.SetNestedSlice(u.Object, []any{}, "spec", "secretObjects"); err != nil {
		t.Fatal(err)
	}
	if c, err := classFrom(&u); err != nil || c.Ref() != "shop/synced" {
		t.Fatalf("empty secretObjects: %+v %v", c, err)
	}
}
