package image

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// BuildTags are the build tags of every binary the project ships (the
// Makefile's GOTAGS, the Dockerfile's -tags). grpcnotrace leaves gRPC's
// request tracing out (golang.org/x/net/trace: never enabled here), whose
// html/template would keep the linker from dropping any unused method:
// 3.5 MB of the node plugin's binary and about 1.7 MiB of its resident
// memory (test/layering checks the node plugin keeps that elimination).
const BuildTags = "grpcnotrace"

// BuildGo cross-compiles main package pkg (e.g. "./cmd/ephemeral-secrets-csi")
// of the module at repoRoot for platform ("linux/amd64"; empty: this host's)
// and returns the binary: static (CGO_ENABLED=0), -trimpath,
// -buildvcs=false, -tags BuildTags, -ldflags "-s -w -buildid= <ldflags>",
// so the same source and toolchain give the same bytes.
func BuildGo(ctx context.Context, repoRoot, pkg, platform string, ldflags string) ([]byte, error) {
	p, err := parsePlatform(platform)
	if err != nil {
		return nil, err
	}
	env := []string{"CGO_ENABLED=0", "GOOS=" + p.OS, "GOARCH=" + p.Architecture}
	switch {
	case p.Variant == "":
	case p.Architecture == "arm":
		env = append(env, "GOARM="+strings.TrimPrefix(p.Variant, "v"))
	case p.Architecture == "amd64":
		env = append(env, "GOAMD64="+p.Variant)
	default:
		return nil, fmt.Errorf("platform %s: cannot build Go for variant %q", p, p.Variant)
	}
	dir, err := os.MkdirTemp("", "image-build-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	out := filepath.Join(dir, "bin")
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-buildvcs=false", "-tags", BuildTags,
		"-ldflags", strings.TrimSpace("-s -w -buildid= "+ldflags), "-o", out, pkg)
	cmd.Dir = repoRoot
	cmd.Env = append(os.Environ(), env...)
	var stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stderr, &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("go build %s for %s: %w\n%s", pkg, p, err, stderr.Bytes())
	}
	return os.ReadFile(out)
}
