package node

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// envInside marks a process that Reexec started inside the namespaces.
const envInside = "ESC_NODE_NAMESPACES"

// Inside reports whether this process runs in the node's namespaces.
func Inside() bool { return os.Getenv(envInside) == "1" }

// Command returns this program, with args, to be run in new network and
// mount namespaces: everything the node does (pod networks, iptables
// rules, mounts under /var/lib/kubelet) stays in them, and goes with their
// last process. files are passed on as fds 3, 4, ...
func Command(args []string, files ...*os.File) (*exec.Cmd, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(self, args...)
	cmd.Env = append(os.Environ(), envInside+"=1")
	cmd.ExtraFiles = files
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET | syscall.CLONE_NEWNS}
	return cmd, nil
}

// RunInside runs this program again, with its arguments, inside new
// namespaces (Command) with this process's standard streams, and returns
// its exit code; the child dies with this process.
func RunInside() int {
	cmd, err := Command(os.Args[1:])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	if err := cmd.Run(); err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return ee.ExitCode()
		}
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// The host directories the node's components use at their standard
// places; each is covered, in the node's mount namespace only, by a tmpfs
// of its own.
var hostDirs = []string{
	"/var/lib/kubelet",
	"/var/lib/containerd",
	"/run/containerd",
	"/run/ephemeral-secrets-csi",
	"/run/netns",
	"/etc/cni/net.d",
	"/var/log/pods",
	"/var/log/containers",
}

// Network of the pods: a bridge whose address is the node's own.
const (
	Bridge    = "cni0"
	NodeIP    = "10.88.0.1"
	PodSubnet = "10.88.0.0/16"
)

// prepare sets up the namespaces this process runs in: mounts that
// propagate among the node's processes and never to the host, the host
// directories covered, loopback, and the pods' bridge.
func prepare() error {
	if !Inside() {
		return errors.New("node: not inside the node's namespaces (start the program with node.Command)")
	}
	// Private from the host first, then shared within: kubelet's
	// Bidirectional mounts need a shared root.
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("making / private: %w", err)
	}
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_SHARED, ""); err != nil {
		return fmt.Errorf("making / shared: %w", err)
	}
	for _, dir := range hostDirs {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
		// A tmpfs, not a bind of a work directory: a bind would show the
		// same directory at two places of one peer group, and the driver's
		// own mounts there would be seen (and left) twice.
		if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "mode=0755"); err != nil {
			return fmt.Errorf("covering %s: %w", dir, err)
		}
	}
	for _, args := range [][]string{
		{"link", "set", "lo", "up"},
		// A fixed address: a bridge otherwise takes the lowest of its
		// ports', so each pod that comes or goes can change the gateway's
		// MAC under the other pods' ARP caches (seen: pods' connections
		// to the node timed out after the driver's pod was replaced).
		{"link", "add", Bridge, "address", "02:65:73:63:00:01", "type", "bridge"},
		{"addr", "add", NodeIP + "/16", "dev", Bridge},
		{"link", "set", Bridge, "up"},
	} {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	return nil
}

// The host directories prepare had to create stay, empty: another node
// on this machine may be using the same paths as its mount points, and
// removing a directory on the shared file system would detach that node's
// mounts (seen with two nodes at once).

// killNamespace kills every process in this process's network namespace
// but this one: containers, their shims and the node's components.
func killNamespace() {
	own, err := os.Readlink("/proc/self/ns/net")
	if err != nil {
		return
	}
	self := os.Getpid()
	for range 5 {
		left := 0
		entries, _ := os.ReadDir("/proc")
		for _, e := range entries {
			var pid int
			if _, err := fmt.Sscanf(e.Name(), "%d", &pid); err != nil || pid == self {
				continue
			}
			if ns, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", pid)); err == nil && ns == own {
				_ = syscall.Kill(pid, syscall.SIGKILL)
				left++
			}
		}
		if left == 0 {
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// Leftovers lists what the node whose supervisor had process ID pid left
// on the host: mounts on the host directories the node covers (its mount
// namespace should have kept them all), its cgroups, and the processes in
// them. Other nodes on the machine are not its business.
func Leftovers(pid int) []string {
	var left []string
	mi, _ := os.ReadFile("/proc/self/mountinfo")
	for _, line := range strings.Split(string(mi), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 {
			continue
		}
		for _, dir := range hostDirs {
			if f[4] == dir || strings.HasPrefix(f[4], dir+"/") {
				left = append(left, "mount "+f[4])
			}
		}
	}
	root := cgroupRootOf(pid)
	dirs, _ := filepath.Glob(filepath.Join(cgroupV1, "*", root))
	for _, d := range dirs {
		left = append(left, "cgroup "+d)
	}
	for _, p := range cgroupProcs(root) {
		left = append(left, fmt.Sprintf("process %d in cgroup %s", p, root))
	}
	return left
}
