// Package image builds single-layer container images without a Docker
// engine: files in one layer, a config, a manifest (an index when several
// platforms share a name), written as one tar that is at once an OCI image
// layout and a `docker save` archive, so that `ctr images import`,
// `kind load image-archive` and `docker load` all accept it. The same inputs
// give a byte-identical archive.
package image

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// File is one regular file of the image.
type File struct {
	Path string // absolute inside the image, e.g. "/ephemeral-secrets-csi"
	Mode os.FileMode
	Data []byte
}

// Spec describes one image for one platform.
type Spec struct {
	Name       string // full reference, registry/repository:tag, e.g. "esc.local/csi-driver:test"
	Platform   string // "linux/amd64", "linux/arm/v7"; empty: runtime.GOOS/GOARCH
	Files      []File // parent directories are created as needed (0755 root:root)
	Entrypoint []string
	Cmd        []string
	User       string // e.g. "65532:65532"; empty: root
	Env        []string
	Labels     map[string]string
}

// Annotations on index.json's entries: containerd names the image after
// AnnotationName (the full reference), OCI tools after annotationRefName
// (the tag alone, as containerd and Docker write it).
const (
	AnnotationName    = "io.containerd.image.name"
	annotationRefName = "org.opencontainers.image.ref.name"
)

// Write writes the images as one archive at path. Specs of the same Name
// but different Platform make one multi-platform index. The archive is an
// OCI image layout (index.json names each image with the
// io.containerd.image.name and org.opencontainers.image.ref.name
// annotations) that also carries Docker's manifest.json; `docker load` is
// single-platform, so manifest.json lists each name's first platform only.
// Timestamps are SOURCE_DATE_EPOCH if set, else 0; entries are sorted and
// owned by 0:0, so the same inputs give the same bytes.
func Write(path string, specs ...Spec) error {
	created, err := sourceDate()
	if err != nil {
		return err
	}
	a, err := assemble(created, specs)
	if err != nil {
		return err
	}
	// A temporary file renamed into place: an interrupted write leaves no
	// truncated archive under the name.
	f, err := os.CreateTemp(filepath.Dir(path), ".image-*.tar")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if err := a.writeTar(f, created); err != nil {
		f.Close()
		return err
	}
	if err := f.Chmod(0o644); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), path)
}

// Index reads index.json back from an archive Write made: one descriptor
// per image name, with its digest (what `ctr images ls` shows).
func Index(path string) (*v1.IndexManifest, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return nil, fmt.Errorf("%s: no index.json: not an OCI image layout", path)
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		if h.Name == "index.json" {
			return v1.ParseIndexManifest(tr)
		}
	}
}

// sourceDate is the time stamped on everything: SOURCE_DATE_EPOCH
// (reproducible-builds.org) when set, else the Unix epoch.
func sourceDate() (time.Time, error) {
	s := os.Getenv("SOURCE_DATE_EPOCH")
	if s == "" {
		return time.Unix(0, 0).UTC(), nil
	}
	sec, err := strconv.ParseInt(s, 10, 64)
	if err != nil || sec < 0 {
		return time.Time{}, fmt.Errorf("SOURCE_DATE_EPOCH=%q is not a non-negative number of seconds", s)
	}
	return time.Unix(sec, 0).UTC(), nil
}

// archive is everything the tar holds: content-addressed blobs, the OCI
// index and Docker's manifest.json entries.
type archive struct {
	blobs  map[v1.Hash][]byte
	index  v1.IndexManifest
	docker []dockerManifest
}

// dockerManifest is one entry of `docker save`'s manifest.json.
type dockerManifest struct {
	Config   string
	RepoTags []string
	Layers   []string
}

func assemble(created time.Time, specs []Spec) (*archive, error) {
	if len(specs) == 0 {
		return nil, fmt.Errorf("no image to write")
	}
	a := &archive{
		blobs: map[v1.Hash][]byte{},
		index: v1.IndexManifest{SchemaVersion: 2, MediaType: types.OCIImageIndex},
	}
	var names []string
	byName := map[string][]Spec{}
	for _, s := range specs {
		if _, ok := byName[s.Name]; !ok {
			names = append(names, s.Name)
		}
		byName[s.Name] = append(byName[s.Name], s)
	}
	for _, n := range names {
		tag, err := name.NewTag(n, name.StrictValidation)
		if err != nil || tag.Name() != n {
			return nil, fmt.Errorf("image name %q: give the full reference, registry/repository:tag (e.g. esc.local/pause:1)", n)
		}
		if err := a.addName(tag, byName[n], created); err != nil {
			return nil, fmt.Errorf("image %s: %w", n, err)
		}
	}
	return a, nil
}

// addName adds the images of one name: a manifest, or an index of
// manifests when there are several platforms.
func (a *archive) addName(tag name.Tag, specs []Spec, created time.Time) error {
	seen := map[string]bool{}
	var adds []mutate.IndexAddendum
	for i, s := range specs {
		p, err := parsePlatform(s.Platform)
		if err != nil {
			return err
		}
		if seen[p.String()] {
			return fmt.Errorf("platform %s given twice", p)
		}
		seen[p.String()] = true
		img, err := build(s, p, created)
		if err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		dm, err := a.addImage(img)
		if err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		if i == 0 {
			dm.RepoTags = []string{tag.Name()}
			a.docker = append(a.docker, dm)
		}
		adds = append(adds, mutate.IndexAddendum{Add: img, Descriptor: v1.Descriptor{Platform: p}})
	}
	var top partial
	if len(adds) == 1 {
		top = adds[0].Add.(v1.Image)
	} else {
		idx := mutate.IndexMediaType(mutate.AppendManifests(empty.Index, adds...), types.OCIImageIndex)
		raw, err := idx.RawManifest()
		if err != nil {
			return err
		}
		a.put(raw)
		top = idx
	}
	desc, err := descriptor(top)
	if err != nil {
		return err
	}
	desc.Annotations = map[string]string{
		AnnotationName:    tag.Name(),
		annotationRefName: tag.TagStr(),
	}
	a.index.Manifests = append(a.index.Manifests, desc)
	return nil
}

// partial is what a descriptor is made of.
type partial interface {
	RawManifest() ([]byte, error)
	MediaType() (types.MediaType, error)
}

func descriptor(p partial) (v1.Descriptor, error) {
	raw, err := p.RawManifest()
	if err != nil {
		return v1.Descriptor{}, err
	}
	mt, err := p.MediaType()
	if err != nil {
		return v1.Descriptor{}, err
	}
	h, _, err := v1.SHA256(bytes.NewReader(raw))
	if err != nil {
		return v1.Descriptor{}, err
	}
	return v1.Descriptor{MediaType: mt, Size: int64(len(raw)), Digest: h}, nil
}

// addImage stores an image's manifest, config and layers as blobs.
func (a *archive) addImage(img v1.Image) (dockerManifest, error) {
	var dm dockerManifest
	raw, err := img.RawManifest()
	if err != nil {
		return dm, err
	}
	a.put(raw)
	cfg, err := img.RawConfigFile()
	if err != nil {
		return dm, err
	}
	dm.Config = blobPath(a.put(cfg))
	layers, err := img.Layers()
	if err != nil {
		return dm, err
	}
	for _, l := range layers {
		rc, err := l.Compressed()
		if err != nil {
			return dm, err
		}
		b, err := io.ReadAll(rc)
		rc.Close()
		if err != nil {
			return dm, err
		}
		dm.Layers = append(dm.Layers, blobPath(a.put(b)))
	}
	return dm, nil
}

func (a *archive) put(b []byte) v1.Hash {
	h, _, _ := v1.SHA256(bytes.NewReader(b)) // reading from memory cannot fail
	a.blobs[h] = b
	return h
}

func blobPath(h v1.Hash) string { return "blobs/" + h.Algorithm + "/" + h.Hex }

// build makes the image of one spec for platform p.
func build(s Spec, p *v1.Platform, created time.Time) (v1.Image, error) {
	layerTar, err := layerTar(s.Files, created)
	if err != nil {
		return nil, err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerTar)), nil
	}, tarball.WithMediaType(types.OCILayer), tarball.WithCompressedCaching)
	if err != nil {
		return nil, err
	}
	cfg := &v1.ConfigFile{
		Architecture: p.Architecture,
		OS:           p.OS,
		Variant:      p.Variant,
		Created:      v1.Time{Time: created},
		RootFS:       v1.RootFS{Type: "layers"},
		Config: v1.Config{
			Entrypoint: s.Entrypoint,
			Cmd:        s.Cmd,
			User:       s.User,
			Env:        s.Env,
			Labels:     s.Labels,
			WorkingDir: "/",
		},
	}
	img, err := mutate.ConfigFile(empty.Image, cfg)
	if err != nil {
		return nil, err
	}
	img = mutate.ConfigMediaType(mutate.MediaType(img, types.OCIManifestSchema1), types.OCIConfigJSON)
	return mutate.Append(img, mutate.Addendum{
		Layer:     layer,
		MediaType: types.OCILayer,
		History: v1.History{
			Created:   v1.Time{Time: created},
			CreatedBy: "github.com/ephemeral-secrets/csi-driver/test/image",
		},
	})
}

func parsePlatform(s string) (*v1.Platform, error) {
	if s == "" {
		return &v1.Platform{OS: runtime.GOOS, Architecture: runtime.GOARCH}, nil
	}
	p, err := v1.ParsePlatform(s)
	if err != nil || p.OS == "" || p.Architecture == "" || p.OSVersion != "" {
		return nil, fmt.Errorf("platform %q: want os/arch[/variant], e.g. linux/amd64", s)
	}
	return p, nil
}

// layerTar is the uncompressed layer: the files and their parent
// directories, sorted, owned by 0:0, stamped with mtime.
func layerTar(files []File, mtime time.Time) ([]byte, error) {
	type entry struct {
		dir  bool
		mode os.FileMode
		data []byte
	}
	entries := map[string]entry{}
	for _, f := range files {
		p := path.Clean(f.Path)
		if !path.IsAbs(f.Path) || p != f.Path || p == "/" {
			return nil, fmt.Errorf("file path %q: want a clean absolute path such as /bin/app", f.Path)
		}
		if !f.Mode.IsRegular() {
			return nil, fmt.Errorf("file %s: mode %v is not a regular file's", p, f.Mode)
		}
		rel := p[1:]
		if _, ok := entries[rel]; ok {
			return nil, fmt.Errorf("file %s given twice", p)
		}
		entries[rel] = entry{mode: f.Mode.Perm(), data: f.Data}
		for d := path.Dir(rel); d != "."; d = path.Dir(d) {
			if e, ok := entries[d]; ok && !e.dir {
				return nil, fmt.Errorf("file %s: %s is a file, not a directory", p, "/"+d)
			}
			entries[d] = entry{dir: true, mode: 0o755}
		}
	}
	names := make([]string, 0, len(entries))
	for n := range entries {
		names = append(names, n)
	}
	sort.Strings(names)
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, n := range names {
		e := entries[n]
		h := &tar.Header{Name: n, Mode: int64(e.mode), ModTime: mtime, Typeflag: tar.TypeReg, Size: int64(len(e.data))}
		if e.dir {
			h.Name, h.Typeflag, h.Size = n+"/", tar.TypeDir, 0
		}
		if err := tw.WriteHeader(h); err != nil {
			return nil, err
		}
		if _, err := tw.Write(e.data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// writeTar writes the OCI layout with Docker's manifest.json beside it.
func (a *archive) writeTar(w io.Writer, mtime time.Time) error {
	index, err := json.Marshal(a.index)
	if err != nil {
		return err
	}
	docker, err := json.Marshal(a.docker)
	if err != nil {
		return err
	}
	files := map[string][]byte{
		"index.json":    index,
		"manifest.json": docker,
		"oci-layout":    []byte(`{"imageLayoutVersion":"1.0.0"}`),
	}
	for h, b := range a.blobs {
		files[blobPath(h)] = b
	}
	names := []string{"blobs/", "blobs/sha256/"}
	for n := range files {
		names = append(names, n)
	}
	sort.Strings(names)
	tw := tar.NewWriter(w)
	for _, n := range names {
		h := &tar.Header{Name: n, Mode: 0o644, ModTime: mtime, Typeflag: tar.TypeReg, Size: int64(len(files[n]))}
		if strings.HasSuffix(n, "/") {
			h.Mode, h.Typeflag = 0o755, tar.TypeDir
		}
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		if _, err := tw.Write(files[n]); err != nil {
			return err
		}
	}
	return tw.Close()
}
