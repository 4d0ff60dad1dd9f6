package image

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

func testSpec(platform string) Spec {
	return Spec{
		Name:       "esc.local/test:1",
		Platform:   platform,
		Files:      []File{{Path: "/bin/app", Mode: 0o755, Data: []byte("#!app")}, {Path: "/etc/app/conf", Mode: 0o600, Data: []byte("k=v\n")}},
		Entrypoint: []string{"/bin/app"},
		Cmd:        []string{"serve"},
		User:       "65532:65532",
		Env:        []string{"A=b"},
		Labels:     map[string]string{"org.opencontainers.image.version": "v1", "a": "b"},
	}
}

func writeSum(t *testing.T, specs ...Spec) (string, string) {
	t.Helper()
	p := filepath.Join(t.TempDir(), "image.tar")
	if err := Write(p, specs...); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	s := sha256.Sum256(b)
	return p, hex.EncodeToString(s[:])
}

func TestWriteIsReproducible(t *testing.T) {
	t.Setenv("SOURCE_DATE_EPOCH", "")
	_, a := writeSum(t, testSpec("linux/amd64"), testSpec("linux/arm64"))
	_, b := writeSum(t, testSpec("linux/amd64"), testSpec("linux/arm64"))
	if a != b {
		t.Fatalf("same inputs, different archives: %s, %s", a, b)
	}
	changed := testSpec("linux/amd64")
	changed.Files[1].Data = []byte("k=w\n")
	if _, c := writeSum(t, changed, testSpec("linux/arm64")); c == a {
		t.Errorf("a changed file left the archive unchanged")
	}
	t.Setenv("SOURCE_DATE_EPOCH", "1700000000")
	if _, d := writeSum(t, testSpec("linux/amd64"), testSpec("linux/arm64")); d == a {
		t.Errorf("SOURCE_DATE_EPOCH left the archive unchanged")
	}
}

// untar extracts an archive, for ggcr's layout reader.
func untar(t *testing.T, archive string) (string, []string) {
	t.Helper()
	dir := t.TempDir()
	f, err := os.Open(archive)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var names []string
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return dir, names
		}
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, h.Name)
		if h.Uid != 0 || h.Gid != 0 || h.ModTime.Unix() != 0 {
			t.Errorf("%s: uid %d gid %d mtime %v", h.Name, h.Uid, h.Gid, h.ModTime)
		}
		p := filepath.Join(dir, h.Name)
		if h.Typeflag == tar.TypeDir {
			if err := os.MkdirAll(p, 0o755); err != nil {
				t.Fatal(err)
			}
			continue
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

func TestWriteMultiPlatformIndex(t *testing.T) {
	t.Setenv("SOURCE_DATE_EPOCH", "")
	p, _ := writeSum(t, testSpec("linux/amd64"), testSpec("linux/arm64"), testSpec("linux/arm/v7"))
	dir, names := untar(t, p)
	want := []string{"blobs/", "blobs/sha256/"}
	if !reflect.DeepEqual(names[:2], want) || names[len(names)-3] != "index.json" || names[len(names)-2] != "manifest.json" || names[len(names)-1] != "oci-layout" {
		t.Errorf("entries %v", names)
	}

	top, err := layout.ImageIndexFromPath(dir)
	if err != nil {
		t.Fatal(err)
	}
	im, err := top.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(im.Manifests) != 1 {
		t.Fatalf("index.json has %d entries, want 1", len(im.Manifests))
	}
	d := im.Manifests[0]
	if d.MediaType != types.OCIImageIndex || d.Annotations[AnnotationName] != "esc.local/test:1" || d.Annotations[annotationRefName] != "1" {
		t.Errorf("index.json entry %+v", d)
	}
	idx, err := top.ImageIndex(d.Digest)
	if err != nil {
		t.Fatal(err)
	}
	nested, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	var platforms []string
	for _, m := range nested.Manifests {
		platforms = append(platforms, m.Platform.String())
		img, err := idx.Image(m.Digest)
		if err != nil {
			t.Fatal(err)
		}
		cf, err := img.ConfigFile()
		if err != nil {
			t.Fatal(err)
		}
		if got := (&v1.Platform{OS: cf.OS, Architecture: cf.Architecture, Variant: cf.Variant}).String(); got != m.Platform.String() {
			t.Errorf("manifest for %s has a config for %s", m.Platform, got)
		}
	}
	if want := []string{"linux/amd64", "linux/arm64", "linux/arm/v7"}; !reflect.DeepEqual(platforms, want) {
		t.Errorf("platforms %v, want %v", platforms, want)
	}

	// docker load's view: manifest.json, first platform only.
	var dm []dockerManifest
	b, _ := os.ReadFile(filepath.Join(dir, "manifest.json"))
	if err := json.Unmarshal(b, &dm); err != nil || len(dm) != 1 || !reflect.DeepEqual(dm[0].RepoTags, []string{"esc.local/test:1"}) {
		t.Errorf("manifest.json %s: %v", b, err)
	}
}

func TestWriteSingleImage(t *testing.T) {
	t.Setenv("SOURCE_DATE_EPOCH", "")
	spec := testSpec("")
	p, _ := writeSum(t, spec)

	// Read it the way `docker load` does, through manifest.json.
	tag, err := name.NewTag(spec.Name)
	if err != nil {
		t.Fatal(err)
	}
	img, err := tarball.ImageFromPath(p, &tag)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	c := cf.Config
	if !reflect.DeepEqual(c.Entrypoint, spec.Entrypoint) || !reflect.DeepEqual(c.Cmd, spec.Cmd) || c.User != spec.User ||
		!reflect.DeepEqual(c.Env, spec.Env) || !reflect.DeepEqual(c.Labels, spec.Labels) || cf.Created.Unix() != 0 {
		t.Errorf("config %+v", cf)
	}
	if cf.OS != "linux" || cf.Architecture == "" {
		t.Errorf("platform %s/%s", cf.OS, cf.Architecture)
	}
	// The OCI layout's view of the same image: the same config.
	dir, _ := untar(t, p)
	lp, err := layout.ImageIndexFromPath(dir)
	if err != nil {
		t.Fatal(err)
	}
	im, err := lp.IndexManifest()
	if err != nil || len(im.Manifests) != 1 {
		t.Fatalf("index.json: %+v %v", im, err)
	}
	dockerConfig, _ := img.ConfigName()
	img, err = lp.Image(im.Manifests[0].Digest)
	if err != nil {
		t.Fatal(err)
	}
	if ociConfig, _ := img.ConfigName(); ociConfig != dockerConfig {
		t.Errorf("manifest.json names config %s, index.json %s", dockerConfig, ociConfig)
	}
	layers, err := img.Layers()
	if err != nil || len(layers) != 1 {
		t.Fatalf("%d layers, %v", len(layers), err)
	}
	mt, _ := layers[0].MediaType()
	if mt != types.OCILayer {
		t.Errorf("layer media type %s", mt)
	}
	rc, err := layers[0].Compressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	zr, err := gzip.NewReader(rc)
	if err != nil {
		t.Fatal(err)
	}
	tr := tar.NewReader(zr)
	var got []string
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(tr)
		got = append(got, h.Name+" "+os.FileMode(h.Mode).String()+" "+string(b))
		if h.Uid != 0 || h.Gid != 0 || h.ModTime.Unix() != 0 {
			t.Errorf("%s: uid %d gid %d mtime %v", h.Name, h.Uid, h.Gid, h.ModTime)
		}
	}
	want := []string{"bin/ -rwxr-xr-x ", "bin/app -rwxr-xr-x #!app", "etc/ -rwxr-xr-x ", "etc/app/ -rwxr-xr-x ", "etc/app/conf -rw------- k=v\n"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("layer\n%q\nwant\n%q", got, want)
	}

	// Index reads back what ctr will name and list.
	im, err = Index(p)
	if err != nil {
		t.Fatal(err)
	}
	dg, _ := img.Digest()
	if len(im.Manifests) != 1 || im.Manifests[0].Digest != dg || im.Manifests[0].MediaType != types.OCIManifestSchema1 {
		t.Errorf("index %+v, image digest %s", im, dg)
	}
}

func TestWriteRefusesBadInput(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		name string
		mod  func(*Spec)
		want string
	}{
		{"short name", func(s *Spec) { s.Name = "pause:1" }, "full reference"},
		{"no tag", func(s *Spec) { s.Name = "esc.local/pause" }, "full reference"},
		{"relative path", func(s *Spec) { s.Files[0].Path = "bin/app" }, "clean absolute path"},
		{"unclean path", func(s *Spec) { s.Files[0].Path = "/bin/../app" }, "clean absolute path"},
		{"duplicate file", func(s *Spec) { s.Files[1].Path = "/bin/app" }, "given twice"},
		{"file as directory", func(s *Spec) { s.Files[1].Path = "/bin/app/x" }, "not a directory"},
		{"directory mode", func(s *Spec) { s.Files[0].Mode = os.ModeDir | 0o755 }, "regular file"},
		{"bad platform", func(s *Spec) { s.Platform = "amd64" }, "want os/arch"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := testSpec("linux/amd64")
			tc.mod(&s)
			p := filepath.Join(dir, "x.tar")
			err := Write(p, s)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err %v, want %q", err, tc.want)
			}
			if _, err := os.Stat(p); err == nil {
				t.Errorf("an archive was written")
			}
		})
	}
	if err := Write(filepath.Join(dir, "x.tar"), testSpec("linux/amd64"), testSpec("linux/amd64")); err == nil || !strings.Contains(err.Error(), "given twice") {
		t.Errorf("duplicate platform: %v", err)
	}
	if err := Write(filepath.Join(dir, "x.tar")); err == nil {
		t.Errorf("no spec: no error")
	}
	if left, _ := os.ReadDir(dir); len(left) != 0 {
		t.Errorf("refused writes left %v behind", left)
	}
}

func TestLayerHasNoSurprises(t *testing.T) {
	// Two specs that differ only in file order give the same layer.
	a, err := layerTar([]File{{"/a", 0o644, []byte("1")}, {"/b/c", 0o644, nil}}, sourceEpoch(t))
	if err != nil {
		t.Fatal(err)
	}
	b, err := layerTar([]File{{"/b/c", 0o644, nil}, {"/a", 0o644, []byte("1")}}, sourceEpoch(t))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a, b) {
		t.Errorf("file order changed the layer")
	}
}

func sourceEpoch(t *testing.T) time.Time {
	t.Helper()
	t.Setenv("SOURCE_DATE_EPOCH", "")
	tm, err := sourceDate()
	if err != nil {
		t.Fatal(err)
	}
	return tm
}
