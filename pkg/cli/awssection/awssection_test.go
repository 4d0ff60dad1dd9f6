package awssection

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ephemeral-secrets/csi-driver/pkg/cli"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// TestCheckConfig loads backend files as the aws node plugin does
// (check-config without its sibling, through Options): the aws section is
// served, every other section as by the lean node plugin, and an aws
// section that does not decode is refused without quoting it.
func TestCheckConfig(t *testing.T) {
	const secret = "s3cr3t-value"
	aws := "aws:\n  region: eu-west-1\n  endpoints: [https://sts.example]\n"
	gcp := "gcp:\n  audience: //iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/k\n  projects: [proj-a]\n"
	pg := "postgres:\n  connections: {}\n"
	for _, tc := range []struct {
		name, file, side string
		code             int
		want             []string // in stdout when the file loads, in stderr when not
	}{
		{"aws", aws, "node", 0, []string{"providers aws"}},
		{"aws and gcp", aws + gcp, "node", 0, []string{"providers aws, gcp"}},
		{"aws without an issuer", aws, "all", 0, []string{"providers aws"}},
		{"the provider's own checks", strings.Replace(aws, "https://sts.example", "sts.example", 1), "node", 1,
			[]string{`aws: endpoint "sts.example" is not an http(s) URL`}},
		{"an unknown key, its value not quoted", aws + "  regoin: " + secret + "\n", "node", 1,
			[]string{"backend config", "not valid (check its keys and indentation)"}},
		{"postgres beside the issuer", aws + pg, "node", 1, []string{"the admin credential belongs to the issuer"}},
		{"postgres in process is the all-in-one's", aws + pg, "all", 1, []string{"ephemeral-secrets-csi-all serve"}},
		{"the issuer's side is the all-in-one's", pg, "issuer", 1, []string{"ephemeral-secrets-csi-all"}},
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
			if out := stdout.String() + stderr.String(); strings.Contains(out, secret) {
				t.Errorf("output quotes the file's value:\n%s", out)
			}
		})
	}
}

// TestOptions: the aws node plugin serves the aws section, runs the
// benchmark's extra providers, and leaves the cluster's commands, the
// issuer's side and the locator to its sibling, the all-in-one.
func TestOptions(t *testing.T) {
	extra := func(*provider.Registry) error { return nil }
	o := Options(extra)
	if len(o.Sections) != 1 || o.Sections[Name].Build == nil {
		t.Errorf("sections %v, want aws only", o.Sections)
	}
	if len(o.Extra) != 1 {
		t.Errorf("%d extra providers, want 1", len(o.Extra))
	}
	if o.Commands != nil || o.CheckIssuer != nil || o.Locate != nil {
		t.Error("the aws node plugin has the all-in-one's commands, issuer check or locator")
	}
}
