package image

import (
	"context"
	_ "embed"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"strings"
)

// The project's images. The Dockerfile describes the same driver image for
// people with Docker: keep the two in agreement.
const (
	// PauseImage is the sandbox image containerd's CRI runs first in each
	// pod (its sandbox_image).
	PauseImage = "esc.local/pause:1"

	// CABundle is where the driver image carries the CA certificates, read
	// from the same path on the build machine (Debian's ca-certificates).
	CABundle = "/etc/ssl/certs/ca-certificates.crt"

	// NonRoot is the user db-check runs as, "nonroot" in /etc/passwd.
	NonRoot = "65532:65532"

	source   = "https://github.com/ephemeral-secrets/csi-driver"
	licenses = "Apache-2.0"
	pathEnv  = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
)

// The user and group files every image carries (the Dockerfile copies the
// same files): root, nobody and nonroot (65532), as in distroless, so a
// numeric user has a name, a home and a shell (nologin) to look up.
var (
	//go:embed rootfs/etc/passwd
	passwd []byte
	//go:embed rootfs/etc/group
	group []byte
)

func baseFiles() []File {
	return []File{
		{Path: "/etc/passwd", Mode: 0o644, Data: passwd},
		{Path: "/etc/group", Mode: 0o644, Data: group},
	}
}

// DriverSpec is the driver's image: its three static binaries, the node
// plugin at /ephemeral-secrets-csi, run as `ephemeral-secrets-csi serve`
// by root (it mounts tmpfs; the image's default command), the node plugin
// with the aws provider at /ephemeral-secrets-csi-aws, and the all-in-one
// at /ephemeral-secrets-csi-all (the issuer, the housekeeper, the
// uninstall hook, and the node plugin with every provider and the issuer
// in process): the chart names the binary as the command where it runs
// another than the default; the build machine's CA certificates,
// /etc/passwd and /etc/group, and the OCI labels.
func DriverSpec(ctx context.Context, repoRoot, platform, name, version string) (Spec, error) {
	return DriverSpecOf(ctx, repoRoot, "./cmd/ephemeral-secrets-csi", platform, name, version)
}

// The main packages of the image's other binaries: the node plugin with
// the aws provider, and the all-in-one.
const (
	AWSPackage = "./cmd/ephemeral-secrets-csi-aws"
	AllPackage = "./cmd/ephemeral-secrets-csi-all"
)

// DriverSpecOf is DriverSpec with the node plugin built from another
// main package of the module, such as the benchmark's build of the driver
// (./test/bench/driver): the same image around a different node plugin.
func DriverSpecOf(ctx context.Context, repoRoot, pkg, platform, name, version string) (Spec, error) {
	ca, err := os.ReadFile(CABundle)
	if errors.Is(err, fs.ErrNotExist) {
		return Spec{}, fmt.Errorf("the driver image needs CA certificates and %s is missing: install them (apt-get install ca-certificates)", CABundle)
	}
	if err != nil {
		return Spec{}, fmt.Errorf("CA certificates: %w", err)
	}
	bin, err := BuildGo(ctx, repoRoot, pkg, platform, "-X main.version="+version)
	if err != nil {
		return Spec{}, err
	}
	aws, err := BuildGo(ctx, repoRoot, AWSPackage, platform, "-X main.version="+version)
	if err != nil {
		return Spec{}, err
	}
	all, err := BuildGo(ctx, repoRoot, AllPackage, platform, "-X main.version="+version)
	if err != nil {
		return Spec{}, err
	}
	labels := labels(ctx, repoRoot)
	labels["org.opencontainers.image.title"] = "ephemeral-secrets-csi"
	labels["org.opencontainers.image.version"] = version
	return Spec{
		Name:     name,
		Platform: platform,
		Files: append(baseFiles(),
			File{Path: "/ephemeral-secrets-csi", Mode: 0o755, Data: bin},
			File{Path: "/ephemeral-secrets-csi-aws", Mode: 0o755, Data: aws},
			File{Path: "/ephemeral-secrets-csi-all", Mode: 0o755, Data: all},
			File{Path: CABundle, Mode: 0o644, Data: ca}),
		Entrypoint: []string{"/ephemeral-secrets-csi"},
		Cmd:        []string{"serve"},
		Env:        []string{pathEnv, "SSL_CERT_FILE=" + CABundle},
		Labels:     labels,
	}, nil
}

// DBCheckSpec is the workload image: examples/db-check at /db-check, run
// as nonroot (65532).
func DBCheckSpec(ctx context.Context, repoRoot, platform, name string) (Spec, error) {
	bin, err := BuildGo(ctx, repoRoot, "./examples/db-check", platform, "")
	if err != nil {
		return Spec{}, err
	}
	labels := labels(ctx, repoRoot)
	labels["org.opencontainers.image.title"] = "db-check"
	return Spec{
		Name:       name,
		Platform:   platform,
		Files:      append(baseFiles(), File{Path: "/db-check", Mode: 0o755, Data: bin}),
		Entrypoint: []string{"/db-check"},
		User:       NonRoot,
		Env:        []string{pathEnv},
		Labels:     labels,
	}, nil
}

// AgentTasksSpec is the lease socket's example image: examples/agent-tasks
// at /agent-tasks, run as nonroot (65532).
func AgentTasksSpec(ctx context.Context, repoRoot, platform, name string) (Spec, error) {
	bin, err := BuildGo(ctx, repoRoot, "./examples/agent-tasks", platform, "")
	if err != nil {
		return Spec{}, err
	}
	labels := labels(ctx, repoRoot)
	labels["org.opencontainers.image.title"] = "agent-tasks"
	return Spec{
		Name:       name,
		Platform:   platform,
		Files:      append(baseFiles(), File{Path: "/agent-tasks", Mode: 0o755, Data: bin}),
		Entrypoint: []string{"/agent-tasks"},
		User:       NonRoot,
		Env:        []string{pathEnv},
		Labels:     labels,
	}, nil
}

// PauseSpec is the sandbox image PauseImage: test/image/pause at /pause,
// run as 65535 like Kubernetes' own pause image.
func PauseSpec(ctx context.Context, repoRoot, platform string) (Spec, error) {
	bin, err := BuildGo(ctx, repoRoot, "./test/image/pause", platform, "")
	if err != nil {
		return Spec{}, err
	}
	return Spec{
		Name:       PauseImage,
		Platform:   platform,
		Files:      append(baseFiles(), File{Path: "/pause", Mode: 0o755, Data: bin}),
		Entrypoint: []string{"/pause"},
		User:       "65535:65535",
	}, nil
}

// labels are the OCI labels every image of ours carries; the revision is
// the checkout's commit, left out when repoRoot is not a git checkout.
func labels(ctx context.Context, repoRoot string) map[string]string {
	l := map[string]string{
		"org.opencontainers.image.source":   source,
		"org.opencontainers.image.licenses": licenses,
	}
	cmd := exec.CommandContext(ctx, "git", "rev-parse", "HEAD")
	cmd.Dir = repoRoot
	if out, err := cmd.Output(); err == nil {
		l["org.opencontainers.image.revision"] = strings.TrimSpace(string(out))
	}
	return l
}
