// Command imagesbom writes a CycloneDX SBOM of one platform's image in an
// OCI image layout (the one `make image` writes, extracted): the image
// itself (its manifest digest), every regular file of its layers with its
// SHA-256, and for each of the driver's binaries the Go modules its own SBOM lists
// (cyclonedx-gomod's, `make sbom`), so that what the image holds beside
// the binary (the CA bundle, /etc/passwd, /etc/group) is in it too.
//
//	imagesbom --layout bin/image-layout --platform linux/amd64 \
//	    --binary /ephemeral-secrets-csi --binary-sbom bin/x-linux-amd64.cdx.json \
//	    --binary /ephemeral-secrets-csi-all --binary-sbom bin/x-all-linux-amd64.cdx.json \
//	    --name ghcr.io/ephemeral-secrets/csi-driver --out bin/image-linux-amd64.cdx.json
//
// The same layout and binary SBOM give the same bytes.
package main

import (
	"archive/tar"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/url"
	"os"
	"path"
	"sort"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "imagesbom:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("imagesbom", flag.ContinueOnError)
	dir := fs.String("layout", "", "an OCI image layout directory")
	platform := fs.String("platform", "linux/amd64", "the image's platform")
	name := fs.String("name", "", "the image's repository, e.g. ghcr.io/ephemeral-secrets/csi-driver")
	var binaries, binarySBOMs repeated
	fs.Var(&binaries, "binary", "the path in the image of a binary its --binary-sbom describes (repeatable, in the same order)")
	fs.Var(&binarySBOMs, "binary-sbom", "a binary's CycloneDX JSON SBOM (repeatable)")
	out := fs.String("out", "", "where to write the image's SBOM")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *dir == "" || *name == "" || *out == "" || len(binaries) != len(binarySBOMs) || fs.NArg() > 0 {
		return errors.New("usage: imagesbom --layout DIR --name REPO --out FILE [--platform OS/ARCH] [--binary PATH --binary-sbom FILE]...")
	}
	img, digest, err := platformImage(*dir, *platform)
	if err != nil {
		return err
	}
	files, err := imageFiles(img)
	if err != nil {
		return err
	}
	bins := map[string]*binaryBOM{}
	for i, binary := range binaries {
		b, err := os.ReadFile(binarySBOMs[i])
		if err != nil {
			return err
		}
		bin := &binaryBOM{}
		if err := json.Unmarshal(b, bin); err != nil {
			return fmt.Errorf("%s: %w", binarySBOMs[i], err)
		}
		if _, ok := files[binary]; !ok {
			return fmt.Errorf("the image has no %s", binary)
		}
		bins[binary] = bin
	}
	doc, err := imageBOM(*name, *platform, digest, files, bins)
	if err != nil {
		return err
	}
	b, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(*out, append(b, '\n'), 0o644)
}

// platformImage finds the platform's image under the layout's one entry
// (an image index, or a single image).
func platformImage(dir, platform string) (v1.Image, v1.Hash, error) {
	want, err := v1.ParsePlatform(platform)
	if err != nil {
		return nil, v1.Hash{}, err
	}
	root, err := layout.ImageIndexFromPath(dir)
	if err != nil {
		return nil, v1.Hash{}, err
	}
	rm, err := root.IndexManifest()
	if err != nil {
		return nil, v1.Hash{}, err
	}
	if len(rm.Manifests) != 1 {
		return nil, v1.Hash{}, fmt.Errorf("%s: index.json has %d entries, want the one image", dir, len(rm.Manifests))
	}
	top := rm.Manifests[0]
	if !top.MediaType.IsIndex() {
		img, err := root.Image(top.Digest)
		return img, top.Digest, err
	}
	idx, err := root.ImageIndex(top.Digest)
	if err != nil {
		return nil, v1.Hash{}, err
	}
	im, err := idx.IndexManifest()
	if err != nil {
		return nil, v1.Hash{}, err
	}
	for _, d := range im.Manifests {
		if d.Platform != nil && d.Platform.Satisfies(*want) {
			img, err := idx.Image(d.Digest)
			return img, d.Digest, err
		}
	}
	return nil, v1.Hash{}, fmt.Errorf("%s: no image for %s", dir, platform)
}

// imageFiles hashes every regular file of the image's layers, the upper
// layer's copy winning.
func imageFiles(img v1.Image) (map[string]string, error) {
	layers, err := img.Layers()
	if err != nil {
		return nil, err
	}
	files := map[string]string{}
	for _, l := range layers {
		rc, err := l.Uncompressed()
		if err != nil {
			return nil, err
		}
		tr := tar.NewReader(rc)
		for {
			h, err := tr.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				rc.Close()
				return nil, err
			}
			p := path.Clean("/" + h.Name)
			if base := path.Base(p); strings.HasPrefix(base, ".wh.") {
				delete(files, path.Join(path.Dir(p), strings.TrimPrefix(base, ".wh.")))
				continue
			}
			if h.Typeflag != tar.TypeReg {
				continue
			}
			sum := sha256.New()
			if _, err := io.Copy(sum, tr); err != nil {
				rc.Close()
				return nil, err
			}
			files[p] = hex.EncodeToString(sum.Sum(nil))
		}
		rc.Close()
	}
	return files, nil
}

// bom is the CycloneDX document written: components and dependencies
// are kept as the binary's SBOM has them (its fields pass through).
type bom struct {
	BOMFormat   string `json:"bomFormat"`
	SpecVersion string `json:"specVersion"`
	Version     int    `json:"version"`
	Metadata    struct {
		Component component `json:"component"`
	} `json:"metadata"`
	Components   []any `json:"components"`
	Dependencies []any `json:"dependencies"`
}

// binaryBOM is the part of the binary's SBOM read.
type binaryBOM struct {
	SpecVersion string `json:"specVersion"`
	Metadata    struct {
		Component map[string]any `json:"component"`
	} `json:"metadata"`
	Components   []json.RawMessage `json:"components"`
	Dependencies []json.RawMessage `json:"dependencies"`
}

type component struct {
	Type       string     `json:"type"`
	BOMRef     string     `json:"bom-ref"`
	Name       string     `json:"name"`
	Version    string     `json:"version,omitempty"`
	PURL       string     `json:"purl,omitempty"`
	Hashes     []hash     `json:"hashes,omitempty"`
	Properties []property `json:"properties,omitempty"`
}

type hash struct {
	Alg     string `json:"alg"`
	Content string `json:"content"`
}

type property struct {
	Name  string `json:"name"`
	Value string `json:"value"`
}

type dependency struct {
	Ref       string   `json:"ref"`
	DependsOn []string `json:"dependsOn,omitempty"`
}

// repeated is a flag given more than once.
type repeated []string

func (r *repeated) String() string     { return strings.Join(*r, ",") }
func (r *repeated) Set(v string) error { *r = append(*r, v); return nil }

// imageBOM is the image's SBOM: the image as the described component; its
// files; each binary of bins (by path) as the application its own SBOM
// describes (with the file's hash and path added), and those SBOMs'
// modules and dependencies, each once. Two binaries of one module share
// their application's bom-ref: with more than one, each is told apart
// by its path (ref#path).
func imageBOM(repo, platform string, digest v1.Hash, files map[string]string, bins map[string]*binaryBOM) (bom, error) {
	arch := platform[strings.Index(platform, "/")+1:]
	purl := fmt.Sprintf("pkg:oci/%s@%s?arch=%s&repository_url=%s", path.Base(repo), url.QueryEscape(digest.String()),
		url.QueryEscape(arch), url.QueryEscape(repo))
	var doc bom
	doc.BOMFormat, doc.SpecVersion, doc.Version = "CycloneDX", "1.5", 1
	for _, bin := range bins {
		if bin.SpecVersion != "" {
			doc.SpecVersion = bin.SpecVersion // the modules' fields are of that version
		}
	}
	doc.Metadata.Component = component{
		Type: "container", BOMRef: purl, Name: repo, Version: digest.String(), PURL: purl,
		Properties: []property{{Name: "oci:platform", Value: platform}},
	}
	paths := make([]string, 0, len(files))
	for p := range files {
		paths = append(paths, p)
	}
	sort.Strings(paths)
	top := dependency{Ref: purl}
	seen := map[string]bool{} // bom-refs of the binaries' modules and dependencies written
	var modules, deps []any
	for _, p := range paths {
		if bin := bins[p]; bin != nil {
			app := bin.Metadata.Component
			ref, _ := app["bom-ref"].(string)
			if app == nil || ref == "" {
				return bom{}, errors.New("the binary's SBOM describes no component with a bom-ref")
			}
			appRef := ref
			if len(bins) > 1 {
				appRef = ref + "#" + p
				app["bom-ref"] = appRef
			}
			for _, c := range bin.Components {
				var m struct {
					Ref string `json:"bom-ref"`
				}
				if json.Unmarshal(c, &m) == nil && !seen["c:"+m.Ref] {
					seen["c:"+m.Ref] = true
					modules = append(modules, c)
				}
			}
			for _, d := range bin.Dependencies {
				var m dependency
				if err := json.Unmarshal(d, &m); err != nil {
					return bom{}, err
				}
				if m.Ref == ref {
					m.Ref = appRef
					deps = append(deps, m)
				} else if !seen["d:"+m.Ref] {
					seen["d:"+m.Ref] = true
					deps = append(deps, d)
				}
			}
			hashes, _ := app["hashes"].([]any)
			app["hashes"] = append(hashes, hash{Alg: "SHA-256", Content: files[p]})
			props, _ := app["properties"].([]any)
			app["properties"] = append(props, property{Name: "oci:path", Value: p})
			doc.Components = append(doc.Components, app)
			top.DependsOn = append(top.DependsOn, appRef)
			continue
		}
		doc.Components = append(doc.Components, component{Type: "file", BOMRef: "file:" + p, Name: p,
			Hashes: []hash{{Alg: "SHA-256", Content: files[p]}}})
		top.DependsOn = append(top.DependsOn, "file:"+p)
	}
	doc.Dependencies = append(doc.Dependencies, top)
	doc.Components = append(doc.Components, modules...)
	doc.Dependencies = append(doc.Dependencies, deps...)
	return doc, nil
}
