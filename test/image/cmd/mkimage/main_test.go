package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ephemeral-secrets/csi-driver/test/image"
)

// TestReproducible builds each image twice, as two `make image` runs
// would: the archives are byte-identical, and the output names the image's
// digest and the archive's sha256.
func TestReproducible(t *testing.T) {
	t.Setenv("SOURCE_DATE_EPOCH", "")
	dir := t.TempDir()
	for _, which := range []string{"driver", "db-check", "agent-tasks", "pause"} {
		t.Run(which, func(t *testing.T) {
			var outs [2]string
			var sums [2][32]byte
			for i := range outs {
				archive := filepath.Join(dir, fmt.Sprintf("%s-%d.tar", which, i))
				var out bytes.Buffer
				if err := run(context.Background(), []string{"--image", which, "--repo", "../../../..", "--version", "v0.0.0-test", "--out", archive}, &out); err != nil {
					t.Fatal(err)
				}
				b, err := os.ReadFile(archive)
				if err != nil {
					t.Fatal(err)
				}
				sums[i] = sha256.Sum256(b)
				outs[i] = strings.ReplaceAll(out.String(), archive, "ARCHIVE")
				idx, err := image.Index(archive)
				if err != nil {
					t.Fatal(err)
				}
				if want := fmt.Sprintf("ARCHIVE: %s@%s\nARCHIVE: archive sha256:%x\n", idx.Manifests[0].Annotations[image.AnnotationName], idx.Manifests[0].Digest, sums[i]); outs[i] != want {
					t.Errorf("output\n%s\nwant\n%s", outs[i], want)
				}
			}
			if sums[0] != sums[1] || outs[0] != outs[1] {
				t.Errorf("two builds differ:\n%s\n%s", outs[0], outs[1])
			}
		})
	}
}

func TestFlags(t *testing.T) {
	out := filepath.Join(t.TempDir(), "x.tar")
	for _, args := range [][]string{
		{"--image", "driver"},
		{"--image", "nginx", "--out", out},
		{"--image", "pause", "--name", "esc.local/other:1", "--out", out},
		{"--image", "pause", "--platforms", "amd64", "--out", out, "--repo", "../../../.."},
	} {
		if err := run(context.Background(), args, &bytes.Buffer{}); err == nil {
			t.Errorf("%q: no error", args)
		}
	}
	if _, err := os.Stat(out); err == nil {
		t.Errorf("a refused command wrote %s", out)
	}
}
