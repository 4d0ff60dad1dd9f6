package tenant

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/ephemeral-secrets/csi-driver/test/standin"
)

// canaries are root-only files planted where a class might point the
// driver, watched with inotify for any open or read.
type canaries struct {
	fd      int
	watches map[int32]string
	// KubeletCert is the kubelet's client certificate and key (CN
	// system:node:test-node), OtherPodKey another pod's TLS key,
	// BackendsCopy a root-only copy of a backend configuration, CADir a
	// directory of CA files.
	KubeletCert, OtherPodKey, BackendsCopy, CADir string
}

func plantCanaries(t *testing.T, base, kubeletDir string) *canaries {
	t.Helper()
	c := &canaries{watches: map[int32]string{},
		KubeletCert:  filepath.Join(kubeletDir, "pki", "kubelet-client-current.pem"),
		OtherPodKey:  filepath.Join(kubeletDir, "pods", "5f0c2a1e-0000-4000-8000-00000000beef", "volumes", "kubernetes.io~secret", "tls", "tls.key"),
		BackendsCopy: filepath.Join(base, "etc", "backends-copy.yaml"),
		CADir:        filepath.Join(base, "etc", "ca"),
	}
	cert, key := standin.ClientPair(t, "system:node:test-node")
	for path, data := range map[string][]byte{
		c.KubeletCert:                    append(cert, key...),
		c.OtherPodKey:                    key,
		c.BackendsCopy:                   []byte("postgres: {connections: {main: {url: postgres://admin:CANARY-ADMIN-PASSWORD@db/}}}\n"),
		filepath.Join(c.CADir, "ca.pem"): cert,
	} {
		if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	var err error
	if c.fd, err = unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(c.fd) })
	for _, p := range []string{c.KubeletCert, c.OtherPodKey, c.BackendsCopy, c.CADir, filepath.Join(c.CADir, "ca.pem"),
		filepath.Dir(c.KubeletCert), filepath.Dir(c.OtherPodKey)} {
		wd, err := unix.InotifyAddWatch(c.fd, p, unix.IN_OPEN|unix.IN_ACCESS)
		if err != nil {
			t.Fatal(err)
		}
		c.watches[int32(wd)] = p
	}
	return c
}

// opened drains the events seen since the last call and returns the
// paths opened or read.
func (c *canaries) opened() []string {
	var out []string
	buf := make([]byte, 64<<10)
	for {
		n, err := unix.Read(c.fd, buf)
		if n <= 0 || err != nil {
			return out
		}
		for off := 0; off+unix.SizeofInotifyEvent <= n; {
			ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
			out = append(out, c.watches[ev.Wd])
			off += unix.SizeofInotifyEvent + int(ev.Len)
		}
	}
}

// peakRSS is the driver process's peak resident memory (VmHWM), in bytes.
func peakRSS(t *testing.T, pid int) int64 {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		var kb int64
		if _, err := fmt.Sscanf(line, "VmHWM: %d kB", &kb); err == nil {
			return kb << 10
		}
	}
	t.Fatal("no VmHWM in /proc/<pid>/status")
	return 0
}

// cpuTime is the CPU time the driver process has used (user and system).
func cpuTime(t *testing.T, pid int) time.Duration {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	// Fields after the command name (which may hold spaces): utime is the
	// 14th field of the line, stime the 15th, in clock ticks (100 a second).
	fields := strings.Fields(string(data[strings.LastIndexByte(string(data), ')')+2:]))
	var utime, stime int64
	fmt.Sscan(fields[11], &utime)
	fmt.Sscan(fields[12], &stime)
	return time.Duration(utime+stime) * 10 * time.Millisecond
}
