// Command mkimage builds one of the project's images as an archive that
// `ctr -n k8s.io images import`, `kind load image-archive` and `docker load`
// accept, without a Docker engine (`make image` runs it):
//
//	mkimage --image driver --name ghcr.io/ephemeral-secrets/csi-driver:v1 \
//	    --platforms linux/amd64,linux/arm64 --version v1 --out bin/ephemeral-secrets-csi-image.tar
//
// It prints the image's digest and the archive's sha256: the same source,
// toolchain and SOURCE_DATE_EPOCH give the same both.
package main

import (
	"context"
	"crypto/sha256"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/ephemeral-secrets/csi-driver/test/image"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "mkimage:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("mkimage", flag.ContinueOnError)
	which := fs.String("image", "driver", "which image: driver, db-check, agent-tasks or pause")
	name := fs.String("name", "", "image reference, registry/repository:tag (default ghcr.io/ephemeral-secrets/csi-driver:VERSION, .../db-check:VERSION, .../agent-tasks:VERSION, "+image.PauseImage+")")
	platforms := fs.String("platforms", "", "comma-separated platforms, e.g. linux/amd64,linux/arm64 (default this machine's)")
	out := fs.String("out", "", "archive to write")
	version := fs.String("version", "dev", "the driver's version (its -X main.version and image label)")
	repo := fs.String("repo", ".", "the module's root directory")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *out == "" || fs.NArg() > 0 {
		return fmt.Errorf("usage: mkimage --image driver|db-check|agent-tasks|pause --out FILE [--name REF] [--platforms LIST] [--version V]")
	}
	var build func(platform string) (image.Spec, error)
	switch *which {
	case "driver":
		if *name == "" {
			*name = "ghcr.io/ephemeral-secrets/csi-driver:" + *version
		}
		build = func(p string) (image.Spec, error) { return image.DriverSpec(ctx, *repo, p, *name, *version) }
	case "db-check":
		if *name == "" {
			*name = "ghcr.io/ephemeral-secrets/db-check:" + *version
		}
		build = func(p string) (image.Spec, error) { return image.DBCheckSpec(ctx, *repo, p, *name) }
	case "agent-tasks":
		if *name == "" {
			*name = "ghcr.io/ephemeral-secrets/agent-tasks:" + *version
		}
		build = func(p string) (image.Spec, error) { return image.AgentTasksSpec(ctx, *repo, p, *name) }
	case "pause":
		if *name != "" && *name != image.PauseImage {
			return fmt.Errorf("the pause image is always named %s", image.PauseImage)
		}
		build = func(p string) (image.Spec, error) { return image.PauseSpec(ctx, *repo, p) }
	default:
		return fmt.Errorf("--image %q: want driver, db-check, agent-tasks or pause", *which)
	}
	var specs []image.Spec
	for _, p := range strings.Split(*platforms, ",") {
		s, err := build(strings.TrimSpace(p))
		if err != nil {
			return err
		}
		specs = append(specs, s)
	}
	if err := image.Write(*out, specs...); err != nil {
		return err
	}
	idx, err := image.Index(*out)
	if err != nil {
		return err
	}
	b, err := os.ReadFile(*out)
	if err != nil {
		return err
	}
	for _, m := range idx.Manifests {
		fmt.Fprintf(stdout, "%s: %s@%s\n", *out, m.Annotations[image.AnnotationName], m.Digest)
	}
	fmt.Fprintf(stdout, "%s: archive sha256:%x\n", *out, sha256.Sum256(b))
	return nil
}
