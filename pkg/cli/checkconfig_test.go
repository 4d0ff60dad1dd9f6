package cli

import (
	"bytes"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/audit"
	"github.com/ephemeral-secrets/csi-driver/pkg/metrics"
)

// TestCheckConfigNodePlugin: the node plugin's binary serves vault and
// postgres through the cluster issuer; a postgres or aws section, and the
// issuer's side, are refused with the binary that serves them named
// (pkg/cli/allinone's test covers every side with every section).
func TestCheckConfigNodePlugin(t *testing.T) {
	const secret = "Adm1n-pw-never-shown"
	dir := t.TempDir()
	vault := "vault:\n  addresses: [https://vault.example:8200]\n"
	pg := "postgres:\n  connections:\n    shop:\n      url: postgres://csi_admin:" + secret + "@127.0.0.1:1/shop\n"
	aws := "aws:\n  region: eu-west-1\n"
	gcp := "gcp:\n  audience: //iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/k\n  projects: [proj-a]\n"
	for _, tc := range []struct {
		name, file, side string
		code             int
		want             []string
	}{
		{"vault", vault, "node", 0, []string{"providers vault"}},
		{"vault and gcp", vault + gcp, "node", 0, []string{"providers gcp, vault"}},
		{"gcp's own checks", strings.Replace(gcp, "//iam.googleapis.com/", "//iam.example/", 1), "node", 1, []string{"gcp: tokenAudience is required"}},
		{"vault, all", vault, "all", 0, []string{"providers vault"}},
		{"postgres beside the issuer", pg + vault, "node", 1, []string{"the admin credential belongs to the issuer", "ephemeral-secrets-csi-all serve"}},
		{"postgres in process", pg, "all", 1, []string{"ephemeral-secrets-csi-all serve"}},
		{"a section this binary does not decode is not located", pg, "node", 1, []string{"does not load"}},
		{"aws", aws, "node", 1, []string{"an aws section", "ephemeral-secrets-csi-aws serve", "providers.aws.enabled"}},
		{"the issuer's side", pg, "issuer", 1, []string{"ephemeral-secrets-csi-all"}},
		// The verdict only: the key's line is the all-in-one's to give
		// (Options.Locate), which this binary runs when it is beside it.
		{"unknown section", vault + "postgress: {}\n", "node", 1, []string{"does not load in the node plugin"}},
		{"a trust file the driver cannot read", vault + "  tls:\n    https://vault.example:8200:\n      caCert: " + filepath.Join(dir, "missing.pem") + "\n", "node", 1,
			[]string{"vault: tls of https://vault.example:8200: caCert"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "backends.yaml")
			if err := os.WriteFile(path, []byte(tc.file), 0o600); err != nil {
				t.Fatal(err)
			}
			var stdout, stderr bytes.Buffer
			code := CheckConfig(Options{}, []string{"--side", tc.side, path}, &stdout, &stderr)
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
			if strings.Contains(got, "postgres: ") || strings.Contains(got, "aws: ") {
				t.Errorf("check-config located a key in a section it does not decode:\n%s", got)
			}
			if all := stdout.String() + stderr.String(); strings.Contains(all, secret) {
				t.Errorf("output quotes the admin password:\n%s", all)
			}
		})
	}
}

// TestCheckConfigAgreesWithTheLoaders: check-config's verdict on a file
// (--side all) is the serving node plugin's (loadBackends, which starts
// what the file configures), for good and bad files alike.
func TestCheckConfigAgreesWithTheLoaders(t *testing.T) {
	files := map[string]string{
		"empty":     "",
		"vault":     "vault:\n  addresses: [https://vault.example:8200]\n",
		"vault bad": "vault:\n  addresses: []\n",
		"gcp":       "gcp:\n  audience: //iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/k\n",
		"gcp bad":   "gcp:\n  tokenLifetimeSeconds: 5\n",
		"not yaml":  "vault: [",
		"aws":       "aws:\n  region: eu-west-1\n",
		"postgres":  "postgres:\n  connections: {}\n",
		"unknown":   "vault:\n  adresses: [https://vault.example:8200]\n",
	}
	m := metrics.New(func() metrics.State { return metrics.State{} })
	for name, content := range files {
		path := filepath.Join(t.TempDir(), "backends.yaml")
		if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		b, err := loadBackends(path, false, nil, time.Millisecond, InProcess{Reap: time.Hour}, audit.New(io.Discard), m, nil)
		if err == nil {
			b.Close()
		}
		got := CheckConfig(Options{}, []string{"--side", "all", path}, io.Discard, io.Discard) == 0
		if want := err == nil; got != want {
			t.Errorf("%s: check-config --side all says loads=%v, the driver's loading %v (%v)", name, got, want, err)
		}
	}
}

func TestCheckConfigUsage(t *testing.T) {
	for _, args := range [][]string{{}, {"--side", "kubelet", "x.yaml"}, {"--nope"}} {
		if code := CheckConfig(Options{}, args, io.Discard, io.Discard); code != 2 {
			t.Errorf("%q: exit %d, want 2", args, code)
		}
	}
	var stderr bytes.Buffer
	if code := CheckConfig(Options{}, []string{filepath.Join(t.TempDir(), "none.yaml")}, io.Discard, &stderr); code != 1 ||
		!strings.Contains(stderr.String(), "no such file") {
		t.Errorf("a missing file: exit %d: %s", code, &stderr)
	}
}
