// Package harness runs the real driver binary for tests: it builds it,
// lays out a kubelet directory and a state directory, starts and kills
// the process, and captures its logs so that tests can search them for
// every secret the suite saw.
package harness

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	mount "k8s.io/mount-utils"

	"github.com/ephemeral-secrets/csi-driver/test/kubelet"
)

// Build compiles ephemeral-secrets-csi-all into dir and returns the
// binary's path: every command (the issuer's too) and the node plugin
// with every provider and the issuer in process.
func Build(dir string) (string, error) {
	return BuildPackage(dir, "./cmd/ephemeral-secrets-csi-all")
}

// BuildNode compiles the node plugin's own binary, ephemeral-secrets-csi
// (vault, and postgres through a cluster issuer), into dir.
func BuildNode(dir string) (string, error) {
	return BuildPackage(dir, "./cmd/ephemeral-secrets-csi")
}

// BuildAWS compiles the node plugin with the aws provider,
// ephemeral-secrets-csi-aws (the chart's node plugin with
// providers.aws.enabled), into dir.
func BuildAWS(dir string) (string, error) {
	return BuildPackage(dir, "./cmd/ephemeral-secrets-csi-aws")
}

// BuildPackage compiles a main package of this module (a test build of the
// driver with an extra provider) into dir.
func BuildPackage(dir, pkg string) (string, error) {
	root, err := moduleRoot()
	if err != nil {
		return "", err
	}
	bin := filepath.Join(dir, filepath.Base(pkg))
	args := []string{"build", "-o", bin}
	if raceEnabled {
		args = append(args, "-race")
	}
	cmd := exec.Command("go", append(args, pkg)...)
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build: %v: %s", err, out)
	}
	return bin, nil
}

func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("go.mod not found")
		}
		dir = parent
	}
}

// LogDir holds the logs of a whole test binary, so that they outlive
// each test's environment until CheckLogs reads them.
var LogDir = sync.OnceValue(func() string {
	dir, err := os.MkdirTemp("", "esc-logs-")
	if err != nil {
		panic(err)
	}
	return dir
})

// LogPath names a new log file in LogDir and registers it.
func LogPath(name string) string {
	f, err := os.CreateTemp(LogDir(), name+"-*.log")
	if err != nil {
		panic(err)
	}
	f.Close()
	RegisterLog(f.Name())
	return f.Name()
}

// Tool finds one of the servers and tools the Makefile installs for tests
// (kube-apiserver, helm, kustomize, vault, minio) in
// ~/.cache/ephemeral-secrets-csi/bin.
func Tool(name string) (string, error) {
	cache, err := os.UserCacheDir()
	if err != nil {
		return "", err
	}
	p := filepath.Join(cache, "ephemeral-secrets-csi", "bin", name)
	if _, err := os.Stat(p); err != nil {
		return "", fmt.Errorf("%s not installed: run make test, or make kube/vault/aws (%w)", name, err)
	}
	return p, nil
}

// Env is one test's directories.
type Env struct {
	Base, KubeletDir, StateDir, Socket string
	// PodView shows KubeletDir as a pod sees it: kubelet's directory is a
	// shared mount (a real node's is, and a real kubelet's bind of a
	// volume into the pod's container is a copy in its peer group), and
	// PodView is a peer of it. What the driver mounts under KubeletDir
	// appears here with the flags the pod gets.
	PodView string
}

// NewEnv makes the directories under a new temporary base.
func NewEnv() (*Env, error) {
	base, err := os.MkdirTemp("", "esc-env-")
	if err != nil {
		return nil, err
	}
	e := &Env{
		Base: base, KubeletDir: filepath.Join(base, "kubelet"), StateDir: filepath.Join(base, "state"),
		Socket: filepath.Join(base, "csi", "csi.sock"), PodView: filepath.Join(base, "podview"),
	}
	for _, d := range []string{e.KubeletDir, e.PodView, filepath.Dir(e.Socket)} {
		if err := os.MkdirAll(d, 0o750); err != nil {
			return nil, err
		}
	}
	if err := peer(e.KubeletDir, e.PodView); err != nil {
		_ = e.Close()
		return nil, err
	}
	return e, nil
}

// peer makes dir a shared mount and view a peer of it.
func peer(dir, view string) error {
	if err := unix.Mount(dir, dir, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("kubelet dir: %w", err)
	}
	if err := unix.Mount("", dir, "", unix.MS_SHARED, ""); err != nil {
		return fmt.Errorf("kubelet dir: %w", err)
	}
	if err := unix.Mount(dir, view, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("pod view: %w", err)
	}
	return nil
}

// InPodView is path (under KubeletDir) as the pod's view shows it.
func (e *Env) InPodView(path string) string {
	rel, err := filepath.Rel(e.KubeletDir, path)
	if err != nil || strings.HasPrefix(rel, "..") {
		return path
	}
	return filepath.Join(e.PodView, rel)
}

// Endpoint is the CSI endpoint URL.
func (e *Env) Endpoint() string { return "unix://" + e.Socket }

// Close unmounts everything under the base and removes it.
func (e *Env) Close() error {
	UnmountUnder(e.Base)
	return os.RemoveAll(e.Base)
}

// Mounts lists the mount points under prefix, deepest first.
func Mounts(prefix string) []string {
	infos, err := mount.ParseMountInfo("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	var out []string
	for _, m := range infos {
		if m.MountPoint == prefix || strings.HasPrefix(m.MountPoint, prefix+"/") {
			out = append(out, m.MountPoint)
		}
	}
	sort.Slice(out, func(i, j int) bool { return len(out[i]) > len(out[j]) })
	return out
}

// MountOptions returns the per-mount options, the filesystem type and the
// superblock options of the mount at path (the last one mounted there).
func MountOptions(path string) (opts []string, fstype, superOpts string, ok bool) {
	infos, err := mount.ParseMountInfo("/proc/self/mountinfo")
	if err != nil {
		return nil, "", "", false
	}
	for _, m := range infos {
		if m.MountPoint == path {
			opts, fstype, superOpts, ok = m.MountOptions, m.FsType, strings.Join(m.SuperOptions, ","), true
		}
	}
	return opts, fstype, superOpts, ok
}

// UnmountUnder detaches every mount under prefix.
func UnmountUnder(prefix string) {
	for range 3 {
		ms := Mounts(prefix)
		if len(ms) == 0 {
			return
		}
		for _, m := range ms {
			_ = unix.Unmount(m, unix.MNT_DETACH)
		}
	}
}

// Driver is the driver binary running as a child process.
type Driver struct {
	Bin     string
	Env     *Env
	Args    []string // extra flags
	LogFile string
	// MetricsAddr is where /metrics is served (127.0.0.1 and a free port).
	MetricsAddr string
	// Environ is added to the driver's environment.
	Environ []string
	cmd     *exec.Cmd
	done    chan struct{}
}

// Start starts the driver and waits until its Probe says ready.
func (d *Driver) Start(ctx context.Context) error {
	if err := d.Launch(); err != nil {
		return err
	}
	return d.waitProbe(ctx)
}

// Launch starts the driver process and returns at once: a second instance
// on the same environment waits for the node lock, so its socket's Probe
// would be the first instance's.
func (d *Driver) Launch() error {
	if d.LogFile == "" {
		d.LogFile = LogPath("driver")
	}
	log, err := os.OpenFile(d.LogFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer log.Close()
	if d.MetricsAddr == "" {
		ports, err := FreePorts(1)
		if err != nil {
			return err
		}
		d.MetricsAddr = fmt.Sprintf("127.0.0.1:%d", ports[0])
	}
	args := append([]string{
		"serve", "--endpoint", d.Env.Endpoint(), "--node-id", "test-node", "--metrics-address", d.MetricsAddr,
		"--state-dir", d.Env.StateDir, "--kubelet-dir", d.Env.KubeletDir, "-v", "10",
	}, d.Args...)
	d.cmd = exec.Command(d.Bin, args...)
	d.cmd.Env = append(os.Environ(), d.Environ...)
	d.cmd.Stdout, d.cmd.Stderr = log, log
	if err := d.cmd.Start(); err != nil {
		return err
	}
	d.done = make(chan struct{})
	go func(c *exec.Cmd, done chan struct{}) { _ = c.Wait(); close(done) }(d.cmd, d.done)
	return nil
}

// Exited is closed when the driver process has exited.
func (d *Driver) Exited() <-chan struct{} { return d.done }

// waitProbe waits until the socket's Probe says ready while the process
// runs.
func (d *Driver) waitProbe(ctx context.Context) error {
	k, err := kubelet.Dial(d.Env.Endpoint(), d.Env.KubeletDir)
	if err != nil {
		return err
	}
	defer k.Close()
	id := csi.NewIdentityClient(k.Conn())
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-d.done:
			out, _ := os.ReadFile(d.LogFile)
			return fmt.Errorf("driver exited: %s", tail(out, 3000))
		default:
		}
		pctx, cancel := context.WithTimeout(ctx, time.Second)
		resp, err := id.Probe(pctx, &csi.ProbeRequest{})
		cancel()
		if err == nil && resp.GetReady().GetValue() {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return errors.New("driver not ready after 30s")
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}

// LogTail is the last n bytes of the driver's log, for a failed test.
func (d *Driver) LogTail(n int) string {
	out, _ := os.ReadFile(d.LogFile)
	return string(tail(out, n))
}

// Scrape fetches path (/metrics, /readyz) from the driver's metrics
// server and returns the status code and body. The body is kept as a log
// that CheckLogs searches for secrets.
func (d *Driver) Scrape(path string) (int, string, error) {
	resp, err := http.Get("http://" + d.MetricsAddr + path)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, "", err
	}
	if err := os.WriteFile(LogPath("scrape"), body, 0o600); err != nil {
		return 0, "", err
	}
	return resp.StatusCode, string(body), nil
}

// Pid is the driver process's ID, 0 when it is not running.
func (d *Driver) Pid() int {
	if d.cmd == nil || d.cmd.Process == nil {
		return 0
	}
	return d.cmd.Process.Pid
}

// Kill ends the driver with SIGKILL, as a crash would.
func (d *Driver) Kill() {
	d.signal(syscall.SIGKILL)
}

// Stop ends the driver with SIGTERM.
func (d *Driver) Stop() {
	d.signal(syscall.SIGTERM)
}

func (d *Driver) signal(sig syscall.Signal) {
	if d.cmd == nil || d.cmd.Process == nil {
		return
	}
	_ = d.cmd.Process.Signal(sig)
	select {
	case <-d.done:
	case <-time.After(15 * time.Second):
		_ = d.cmd.Process.Kill()
		<-d.done
	}
	d.cmd = nil
}

var (
	secretsMu sync.Mutex
	secrets   = map[string]bool{}
	logFiles  = map[string]bool{}
)

// RememberSecret records a value that must never appear in a log.
func RememberSecret(s string) {
	if len(s) < 8 {
		return // too short to search for without false hits
	}
	secretsMu.Lock()
	defer secretsMu.Unlock()
	secrets[s] = true
}

// RegisterLog records a log file to search.
func RegisterLog(path string) {
	secretsMu.Lock()
	defer secretsMu.Unlock()
	logFiles[path] = true
}

// ReportLogs runs CheckLogs for a TestMain: it prints the outcome and
// returns the exit code to use (1 on any finding).
func ReportLogs() int {
	n, lines, err := CheckLogs()
	if err != nil {
		fmt.Println("FAIL: log check:", err)
		return 1
	}
	fmt.Printf("log check: %d secrets searched in %d log lines: none found\n", n, lines)
	return 0
}

// CheckLogs searches every registered log for every remembered secret. It
// fails if no secret was remembered or no log line read: a check that
// cannot fail is no check.
func CheckLogs() (secretCount, lineCount int, err error) {
	secretsMu.Lock()
	defer secretsMu.Unlock()
	var leaks []string
	for path := range logFiles {
		data, rerr := os.ReadFile(path)
		if rerr != nil {
			continue
		}
		lineCount += bytes.Count(data, []byte("\n"))
		if i := bytes.Index(data, []byte("WARNING: DATA RACE")); i >= 0 {
			report := data[i:]
			if j := bytes.Index(report, []byte("\n==================")); j > 0 {
				report = report[:j]
			}
			leaks = append(leaks, path+" reports a data race:\n"+string(report))
		}
		for s := range secrets {
			if bytes.Contains(data, []byte(s)) {
				leaks = append(leaks, fmt.Sprintf("%s holds a secret (%d chars, starts %q)", path, len(s), s[:3]))
			}
		}
	}
	if len(leaks) > 0 {
		return len(secrets), lineCount, fmt.Errorf("log check:\n%s", strings.Join(leaks, "\n"))
	}
	if len(secrets) == 0 || lineCount == 0 {
		return len(secrets), lineCount, fmt.Errorf("log check ran on %d secrets and %d log lines: nothing was checked", len(secrets), lineCount)
	}
	return len(secrets), lineCount, nil
}
