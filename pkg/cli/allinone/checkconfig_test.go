package allinone

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"io"
	"math/big"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/cli"
	"github.com/ephemeral-secrets/csi-driver/pkg/issuer"
	"github.com/ephemeral-secrets/csi-driver/test/docs/backendsref"
)

// checkSecret is in every file's admin URL: no output may quote it.
const checkSecret = "Adm1n-pw-never-shown"

// a postgres section with one role; bad files are made from it by
// replacing one line.
const checkPG = `postgres:
  connections:
    shop:
      url: postgres://csi_admin:` + checkSecret + `@127.0.0.1:1/shop
      roles:
        reader:
          defaultTTL: 1h
          maxTTL: 24h
          creationStatements:
            - CREATE ROLE "{{.Name}}" LOGIN PASSWORD '{{.Password}}'
          allowed: [{namespace: team-a, serviceAccount: app}]
`

// testCA writes a self-signed CA certificate (PEM) to dir.
func testCA(t *testing.T, dir string) string {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestCheckConfig(t *testing.T) {
	dir := t.TempDir()
	ca := testCA(t, dir)
	vault := "vault:\n  addresses: [https://vault.example:8200]\n  tls:\n    https://vault.example:8200:\n      caCert: " + ca + "\n"
	aws := "aws:\n  region: eu-west-1\n  endpoints: [https://sts.example]\n"
	gcp := "gcp:\n  audience: //iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/k\n  projects: [proj-a]\n"
	pgWith := func(old, new string) string {
		if !strings.Contains(checkPG, old) {
			t.Fatalf("no %q in the postgres section", old)
		}
		return strings.Replace(checkPG, old, new, 1)
	}
	for _, tc := range []struct {
		name, file, side string
		code             int
		// want are in stdout when the file loads, in stderr when not.
		want []string
	}{
		{"issuer: postgres", checkPG, "issuer", 0, []string{"loads in the issuer", "postgres connections shop (roles reader)"}},
		{"issuer: other sections not read", checkPG + vault + aws + gcp, "issuer", 0, []string{"not read by the issuer: vault, aws, gcp"}},
		{"issuer: no postgres section", vault, "issuer", 1, []string{"no postgres section"}},
		{"node: vault, aws and gcp", vault + aws + gcp, "node", 0, []string{"providers aws, gcp, vault"}},
		{"node: postgres refused beside the issuer", checkPG + aws, "node", 1, []string{"the admin credential belongs to the issuer"}},
		{"all: postgres in process", checkPG + vault, "all", 0, []string{"providers postgres, vault"}},
		{"node: an empty file configures nothing", "", "node", 0, []string{"no provider configured"}},
		{"unknown key", pgWith("maxTTL: 24h", "maxTL: 24h"), "issuer", 1,
			[]string{"not valid", "line 8: postgres.connections[shop].roles[reader].maxTL: unknown key; known here:", "maxTTL"}},
		{"unknown section", checkPG + "postgress: {}\n", "all", 1, []string{"line 12: postgress: unknown key; known here: aws, gcp, postgres, vault"}},
		{"key given twice", pgWith("maxTTL: 24h", "maxTTL: 24h\n          maxTTL: 2h"), "all", 1,
			[]string{"line 9: postgres.connections[shop].roles[reader].maxTTL: given twice"}},
		{"wrong kind", pgWith("      roles:", "      maxConns: four\n      roles:"), "issuer", 1,
			[]string{"line 5: postgres.connections[shop].maxConns: a whole number expected"}},
		{"a list expected", pgWith("allowed: [{namespace: team-a, serviceAccount: app}]", "allowed: {namespace: team-a}"), "issuer", 1,
			[]string{"postgres.connections[shop].roles[reader].allowed: a list expected"}},
		{"YAML syntax on the password's line", pgWith("@127.0.0.1:1/shop", "@127.0.0.1:1/shop: \"x"), "issuer", 1,
			[]string{"not valid", "not valid YAML"}},
		{"a value made into a key by indentation is not shown", pgWith("      roles:", "      postgres://csi_admin:"+checkSecret+"@db: x\n      roles:"), "issuer", 1,
			[]string{"(a key not shown): unknown key"}},
		{"url that does not parse", pgWith("@127.0.0.1:1/shop", "@127.0.0.1:port/shop"), "issuer", 1,
			[]string{`postgres: connection "shop": url cannot be parsed`}},
		{"the issuer's checks", pgWith("defaultTTL: 1h", "defaultTTL: 48h"), "issuer", 1, []string{"defaultTTL exceeds maxTTL"}},
		{"PlainPassword refused", pgWith("{{.Password}}", "{{.PlainPassword}}"), "all", 1, []string{"use {{.Password}}"}},
		{"a trust file the driver cannot read", strings.Replace(vault, ca, filepath.Join(dir, "missing.pem"), 1), "node", 1,
			[]string{"vault: tls of https://vault.example:8200: caCert"}},
		{"an address that is not a URL", "vault:\n  addresses: [vault.example:8200]\n", "node", 1, []string{"not an http(s) URL"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "backends.yaml")
			if err := os.WriteFile(path, []byte(tc.file), 0o600); err != nil {
				t.Fatal(err)
			}
			var stdout, stderr bytes.Buffer
			code := cli.CheckConfig(Options(), []string{"--side", tc.side, path}, &stdout, &stderr)
			if code != tc.code {
				t.Fatalf("exit code %d, want %d\nstdout: %s\nstderr: %s", code, tc.code, &stdout, &stderr)
			}
			got := stdout.String()
			if code != 0 {
				got = stderr.String()
			}
			for _, w := range tc.want {
				if !strings.Contains(got, w) {
					t.Errorf("output lacks %q:\n%s", w, got)
				}
			}
			if !strings.Contains(got, path) {
				t.Errorf("output does not name the file:\n%s", got)
			}
			if all := stdout.String() + stderr.String(); strings.Contains(all, checkSecret) {
				t.Errorf("output quotes the admin password:\n%s", all)
			}
		})
	}
}

// TestCheckConfigAgreesWithTheLoaders: check-config's verdict on a file
// is the issuer command's (readIssuerConfig and issuer.New), for good and
// bad files alike (the serving driver's: pkg/cli's test of the same name).
func TestCheckConfigAgreesWithTheLoaders(t *testing.T) {
	files := map[string]string{
		"good":             checkPG,
		"bad TTLs":         strings.Replace(checkPG, "defaultTTL: 1h", "defaultTTL: 2s", 1),
		"unknown key":      strings.Replace(checkPG, "maxTTL:", "maxTL:", 1),
		"no postgres":      "aws:\n  region: eu-west-1\n",
		"vault bad":        "vault:\n  addresses: []\n",
		"gcp bad":          "gcp:\n  tokenLifetimeSeconds: 5\n",
		"not yaml":         "postgres: [",
		"no roles":         "postgres:\n  connections:\n    shop:\n      url: postgres://a:" + checkSecret + "@127.0.0.1:1/x\n",
		"role not allowed": strings.Replace(checkPG, "allowed: [{namespace: team-a, serviceAccount: app}]", "allowed: []", 1),
	}
	for name, content := range files {
		path := filepath.Join(t.TempDir(), "backends.yaml")
		if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		check := func(side string) bool {
			return cli.CheckConfig(Options(), []string{"--side", side, path}, io.Discard, io.Discard) == 0
		}
		cfg, err := readIssuerConfig(path)
		if err == nil {
			var iss *issuer.Issuer
			if iss, err = issuer.New(issuer.Options{Config: cfg}); err == nil {
				iss.Close()
			}
		}
		if got, want := check("issuer"), err == nil; got != want {
			t.Errorf("%s: check-config --side issuer says loads=%v, the issuer's loading %v (%v)", name, got, want, err)
		}
	}
}

// The examples an admin starts from load on the side the docs give them.
func TestCheckConfigExamples(t *testing.T) {
	for _, tc := range []struct{ side, file string }{
		{"issuer", "../../../examples/postgres/admin/backends.yaml"},
		{"all", "../../../examples/postgres/admin/backends.yaml"},
		{"node", "../../../examples/aws/admin/backends.yaml"},
		{"node", "../../../examples/gcp/admin/backends.yaml"},
	} {
		var stderr bytes.Buffer
		if code := cli.CheckConfig(Options(), []string{"--side", tc.side, tc.file}, io.Discard, &stderr); code != 0 {
			t.Errorf("%s as %s: exit %d: %s", tc.file, tc.side, code, &stderr)
		}
	}
}

// TestReferenceHasEveryKey: the generated reference of the backend file
// (docs/backends.md, read from the source by test/docs/backendsref) lists
// exactly the keys the decoder knows (check-config's walk of the same
// types by reflection, as encoding/json reads them: Keys).
func TestReferenceHasEveryKey(t *testing.T) {
	documented, err := backendsref.Keys("../../..")
	if err != nil {
		t.Fatal(err)
	}
	decoded := Keys(reflect.TypeFor[backendConfig]())
	if !slices.Equal(documented, decoded) {
		t.Errorf("the reference's keys differ from the decoder's:\nreference: %q\ndecoder:   %q", documented, decoded)
	}
	if len(decoded) < 30 {
		t.Errorf("only %d keys: the walk missed the sections", len(decoded))
	}
}
