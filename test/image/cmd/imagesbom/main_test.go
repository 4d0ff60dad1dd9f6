package main

import (
	"archive/tar"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ephemeral-secrets/csi-driver/test/image"
)

// binarySBOM is shaped like cyclonedx-gomod's: the application and one module.
const binarySBOM = `{
  "bomFormat": "CycloneDX", "specVersion": "1.5", "version": 1,
  "metadata": {"component": {"type": "application", "bom-ref": "pkg:golang/example.com/app@v1.0.0?type=module",
    "name": "example.com/app", "version": "v1.0.0", "hashes": [{"alg": "SHA-256", "content": "00"}]}},
  "components": [{"type": "library", "bom-ref": "pkg:golang/golang.org/x/sys@v0.1.0?type=module", "name": "golang.org/x/sys",
    "version": "v0.1.0", "licenses": [{"license": {"id": "BSD-3-Clause"}}]}],
  "dependencies": [{"ref": "pkg:golang/example.com/app@v1.0.0?type=module", "dependsOn": ["pkg:golang/golang.org/x/sys@v0.1.0?type=module"]}]
}`

// layoutOf writes the images with the project's image writer and extracts
// the archive, as make release-push does.
func layoutOf(t *testing.T, specs ...image.Spec) string {
	t.Helper()
	dir := t.TempDir()
	archive := filepath.Join(dir, "image.tar")
	if err := image.Write(archive, specs...); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "layout")
	f, err := os.Open(archive)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(out, h.Name)
		if h.Typeflag == tar.TypeDir {
			continue
		}
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func sum(b []byte) string { s := sha256.Sum256(b); return hex.EncodeToString(s[:]) }

func TestImageSBOM(t *testing.T) {
	files := func(arch string) []image.File {
		return []image.File{
			{Path: "/app", Mode: 0o755, Data: []byte("binary for " + arch)},
			{Path: "/etc/ssl/certs/ca-certificates.crt", Mode: 0o644, Data: []byte("certificates")},
			{Path: "/etc/passwd", Mode: 0o644, Data: []byte("root:x:0:0::/:/sbin/nologin\n")},
		}
	}
	dir := layoutOf(t,
		image.Spec{Name: "example.com/app:v1", Platform: "linux/amd64", Files: files("amd64"), Entrypoint: []string{"/app"}},
		image.Spec{Name: "example.com/app:v1", Platform: "linux/arm64", Files: files("arm64"), Entrypoint: []string{"/app"}})
	sbomFile := filepath.Join(t.TempDir(), "bin.cdx.json")
	if err := os.WriteFile(sbomFile, []byte(binarySBOM), 0o644); err != nil {
		t.Fatal(err)
	}
	digests := map[string]string{}
	for _, arch := range []string{"amd64", "arm64"} {
		out := filepath.Join(t.TempDir(), "image.cdx.json")
		if err := run([]string{"--layout", dir, "--platform", "linux/" + arch, "--name", "example.com/app",
			"--binary", "/app", "--binary-sbom", sbomFile, "--out", out}); err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(out)
		if err != nil {
			t.Fatal(err)
		}
		var doc struct {
			Metadata struct {
				Component struct{ Type, Version, PURL string }
			}
			Components []struct {
				Type, Name string
				BOMRef     string `json:"bom-ref"`
				Hashes     []struct{ Alg, Content string }
			}
			Dependencies []struct {
				Ref       string
				DependsOn []string
			}
		}
		if err := json.Unmarshal(b, &doc); err != nil {
			t.Fatal(err)
		}
		m := doc.Metadata.Component
		if m.Type != "container" || !strings.HasPrefix(m.Version, "sha256:") || !strings.Contains(m.PURL, "arch="+arch) {
			t.Fatalf("%s: the image component %+v", arch, m)
		}
		digests[arch] = m.Version
		// The manifest the SBOM names is a blob of the layout.
		if _, err := os.Stat(filepath.Join(dir, "blobs", "sha256", strings.TrimPrefix(m.Version, "sha256:"))); err != nil {
			t.Fatalf("%s: the SBOM names %s, not in the layout", arch, m.Version)
		}
		got := map[string][]string{}
		for _, c := range doc.Components {
			var hs []string
			for _, h := range c.Hashes {
				hs = append(hs, h.Content)
			}
			got[c.Name] = hs
		}
		want := map[string][]string{
			"/etc/ssl/certs/ca-certificates.crt": {sum([]byte("certificates"))},
			"/etc/passwd":                        {sum([]byte("root:x:0:0::/:/sbin/nologin\n"))},
			"example.com/app":                    {"00", sum([]byte("binary for " + arch))},
			"golang.org/x/sys":                   nil,
		}
		for name, hs := range want {
			g, ok := got[name]
			if !ok || strings.Join(g, ",") != strings.Join(hs, ",") {
				t.Errorf("%s: component %s hashes %v (present %v), want %v", arch, name, g, ok, hs)
			}
		}
		if len(got) != len(want) {
			t.Errorf("%s: components %v, want %d", arch, got, len(want))
		}
		if len(doc.Dependencies) != 2 || doc.Dependencies[0].Ref != m.PURL || len(doc.Dependencies[0].DependsOn) != 3 {
			t.Errorf("%s: dependencies %+v", arch, doc.Dependencies)
		}
	}
	if digests["amd64"] == digests["arm64"] {
		t.Error("both platforms' SBOMs name the same image")
	}
	for _, bad := range [][]string{
		{"--layout", dir, "--platform", "linux/s390x", "--name", "x", "--out", filepath.Join(t.TempDir(), "o")},
		{"--layout", dir, "--name", "x", "--binary", "/missing", "--binary-sbom", sbomFile, "--out", filepath.Join(t.TempDir(), "o")},
		{"--layout", dir, "--name", "x", "--binary", "/app", "--out", filepath.Join(t.TempDir(), "o")},
	} {
		if err := run(bad); err == nil {
			t.Errorf("imagesbom %v: no error", bad)
		}
	}
}

// TestImageSBOMTwoBinaries: an image with two binaries of one module (the
// node plugin and the all-in-one) lists each as its own application,
// told apart by its path, and their shared modules and dependencies once.
func TestImageSBOMTwoBinaries(t *testing.T) {
	files := []image.File{
		{Path: "/app", Mode: 0o755, Data: []byte("node")},
		{Path: "/app-all", Mode: 0o755, Data: []byte("all")},
	}
	dir := layoutOf(t, image.Spec{Name: "example.com/app:v1", Platform: "linux/amd64", Files: files, Entrypoint: []string{"/app"}})
	sbomFile := filepath.Join(t.TempDir(), "bin.cdx.json")
	if err := os.WriteFile(sbomFile, []byte(binarySBOM), 0o644); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "image.cdx.json")
	if err := run([]string{"--layout", dir, "--platform", "linux/amd64", "--name", "example.com/app",
		"--binary", "/app", "--binary-sbom", sbomFile, "--binary", "/app-all", "--binary-sbom", sbomFile, "--out", out}); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Components []struct {
			Name   string
			BOMRef string `json:"bom-ref"`
			Hashes []struct{ Content string }
		}
		Dependencies []struct {
			Ref       string
			DependsOn []string
		}
	}
	if err := json.Unmarshal(b, &doc); err != nil {
		t.Fatal(err)
	}
	const app = "pkg:golang/example.com/app@v1.0.0?type=module"
	refs := map[string]int{}
	for _, c := range doc.Components {
		refs[c.BOMRef]++
	}
	for _, want := range []string{app + "#/app", app + "#/app-all", "pkg:golang/golang.org/x/sys@v0.1.0?type=module"} {
		if refs[want] != 1 {
			t.Errorf("component %s listed %d times, want once: %v", want, refs[want], refs)
		}
	}
	deps := map[string][]string{}
	for _, d := range doc.Dependencies {
		deps[d.Ref] = d.DependsOn
	}
	for _, ref := range []string{app + "#/app", app + "#/app-all"} {
		if len(deps[ref]) != 1 {
			t.Errorf("dependencies of %s: %v", ref, deps[ref])
		}
	}
	if len(doc.Dependencies) != 3 {
		t.Errorf("dependencies %+v, want the image's and each binary's", doc.Dependencies)
	}
}
