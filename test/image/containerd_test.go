package image

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ephemeral-secrets/csi-driver/test/harness"
)

// containerd is a private containerd (its own root, state and socket under
// a temporary directory, the CRI plugin off) for import-and-run tests.
type containerd struct {
	t       *testing.T
	address string
}

func startContainerd(t *testing.T) *containerd {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("containerd needs root")
	}
	for _, b := range []string{"containerd", "ctr", "runc", "containerd-shim-runc-v2"} {
		if _, err := exec.LookPath(b); err != nil {
			t.Skipf("%s is not installed (Debian: apt-get install containerd runc)", b)
		}
	}
	// Short: the socket path must fit in sockaddr_un.
	dir, err := os.MkdirTemp("", "ctrd-")
	if err != nil {
		t.Fatal(err)
	}
	c := &containerd{t: t, address: filepath.Join(dir, "c.sock")}
	config := fmt.Sprintf(`version = 2
root = %[1]q
state = %[2]q
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = %[3]q
[plugins."io.containerd.internal.v1.opt"]
  path = %[4]q
`, filepath.Join(dir, "root"), filepath.Join(dir, "state"), c.address, filepath.Join(dir, "opt"))
	cfgPath := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(cfgPath, []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	log, err := os.Create(filepath.Join(dir, "containerd.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("containerd", "--config", cfgPath)
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var waitErr error
	done := make(chan struct{})
	go func() { waitErr = cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		log.Close()
		if t.Failed() {
			b, _ := os.ReadFile(log.Name())
			t.Logf("containerd log:\n%s", b)
		}
		harness.UnmountUnder(dir)
		if err := os.RemoveAll(dir); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	harness.Eventually(t, time.Minute, "containerd answers", func() (bool, error) {
		select {
		case <-done:
			b, _ := os.ReadFile(log.Name())
			t.Fatalf("containerd exited: %v\n%s", waitErr, b)
		default:
		}
		_, err := c.ctr(context.Background(), "version")
		return err == nil, err
	})
	return c
}

// ctr runs ctr against the private containerd in namespace k8s.io, as
// kubelet's containerd would see the images.
func (c *containerd) ctr(ctx context.Context, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, "ctr", append([]string{"--address", c.address, "-n", "k8s.io"}, args...)...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("ctr %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// TestImportAndRun imports an archive of ours into a real containerd and
// runs it with runc: the name is listed, and the container runs the
// entrypoint and cmd as the image's user and sees the image's files.
func TestImportAndRun(t *testing.T) {
	ctx := context.Background()
	c := startContainerd(t)
	hello, err := BuildGo(ctx, "../..", "./test/image/internal/hello", "", "")
	if err != nil {
		t.Fatal(err)
	}
	const ref = "esc.local/hello:test"
	archive := filepath.Join(t.TempDir(), "hello.tar")
	err = Write(archive, Spec{
		Name:       ref,
		Files:      append(baseFiles(), File{Path: "/usr/bin/hello", Mode: 0o755, Data: hello}),
		Entrypoint: []string{"/usr/bin/hello", "-cat", "/etc/passwd"},
		Cmd:        []string{"from", "the", "image"},
		User:       NonRoot,
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.ctr(ctx, "images", "import", archive); err != nil {
		t.Fatal(err)
	}
	names, err := c.ctr(ctx, "images", "ls", "-q")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("ctr images ls -q:\n%s", names)
	if !strings.Contains("\n"+names, "\n"+ref+"\n") {
		t.Fatalf("ctr images ls does not list %s:\n%s", ref, names)
	}
	im, err := Index(archive)
	if err != nil {
		t.Fatal(err)
	}
	if out, err := c.ctr(ctx, "images", "ls", "name=="+ref); err != nil || !strings.Contains(out, im.Manifests[0].Digest.String()) {
		t.Errorf("ctr lists %s without the digest %s: %s %v", ref, im.Manifests[0].Digest, out, err)
	}
	out, err := c.ctr(ctx, "run", "--rm", ref, "hello-test")
	if err != nil {
		t.Fatal(err)
	}
	if want := `hello from the image uid=65532 gid=65532 cat=["root:x:0:0:root:/root:/sbin/nologin"]`; strings.TrimSpace(out) != want {
		t.Errorf("container printed %q, want %q", out, want)
	}
}

// TestImportMultiPlatform imports a two-platform archive the way `kind load
// image-archive` does (all platforms, from stdin) and runs the host's.
func TestImportMultiPlatform(t *testing.T) {
	ctx := context.Background()
	c := startContainerd(t)
	hello, err := BuildGo(ctx, "../..", "./test/image/internal/hello", "", "")
	if err != nil {
		t.Fatal(err)
	}
	const ref = "esc.local/hello:multi"
	other := "linux/arm64"
	if runtime.GOARCH == "arm64" {
		other = "linux/amd64"
	}
	var specs []Spec
	for _, p := range []string{other, runtime.GOOS + "/" + runtime.GOARCH} {
		// The same binary in both: only the host's ever runs.
		specs = append(specs, Spec{
			Name:       ref,
			Platform:   p,
			Files:      []File{{Path: "/hello", Mode: 0o755, Data: hello}, {Path: "/platform", Mode: 0o644, Data: []byte(p)}},
			Entrypoint: []string{"/hello", "-cat", "/platform"},
		})
	}
	archive := filepath.Join(t.TempDir(), "multi.tar")
	if err := Write(archive, specs...); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(archive)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	imp := exec.CommandContext(ctx, "ctr", "--address", c.address, "-n", "k8s.io", "images", "import", "--all-platforms", "--digests", "--snapshotter", "overlayfs", "-")
	imp.Stdin = f
	if out, err := imp.CombinedOutput(); err != nil {
		t.Fatalf("import: %v\n%s", err, out)
	}
	ls, err := c.ctr(ctx, "images", "ls", "name=="+ref)
	if err != nil || !strings.Contains(ls, "linux/amd64,linux/arm64") {
		t.Errorf("ctr does not list both platforms of %s: %v\n%s", ref, err, ls)
	}
	out, err := c.ctr(ctx, "run", "--rm", ref, "hello-multi")
	if want := fmt.Sprintf("hello  uid=0 gid=0 cat=[%q]", runtime.GOOS+"/"+runtime.GOARCH); err != nil || strings.TrimSpace(out) != want {
		t.Errorf("container printed %q (%v), want %q", out, err, want)
	}
}
