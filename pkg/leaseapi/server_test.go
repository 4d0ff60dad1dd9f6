package leaseapi

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// listen binds where a socket address could not reach (a path over 108
// bytes), makes the socket root:gid 0660, and replaces a stale socket of
// an earlier run.
func TestListenLongPathOwnerAndStaleSocket(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to give the socket to a group")
	}
	dir := filepath.Join(t.TempDir(), strings.Repeat("d", 100))
	if err := os.Mkdir(dir, 0o750); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "lease.sock")
	if len(path) < 108 {
		t.Fatalf("path %d bytes: not long enough to test", len(path))
	}
	for round := range 2 { // the second finds the first's socket file
		ln, err := listen(path, 1234)
		if err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		st, err := os.Lstat(path)
		if err != nil {
			t.Fatal(err)
		}
		sys := st.Sys().(*syscall.Stat_t)
		if st.Mode()&os.ModeSocket == 0 || st.Mode().Perm() != 0o660 || sys.Uid != 0 || sys.Gid != 1234 {
			t.Errorf("round %d: %v %d:%d, want a socket 0660 0:1234", round, st.Mode(), sys.Uid, sys.Gid)
		}
		go func() {
			if c, err := ln.Accept(); err == nil {
				c.Close()
			}
		}()
		d, err := os.Open(dir)
		if err != nil {
			t.Fatal(err)
		}
		c, err := net.Dial("unix", fmt.Sprintf("/proc/self/fd/%d/lease.sock", d.Fd()))
		d.Close()
		if err != nil {
			t.Fatalf("round %d: dial: %v", round, err)
		}
		c.Close()
		ln.Close()
		if _, err := os.Lstat(path); err != nil {
			t.Fatalf("round %d: closing the listener removed the socket (the next start listens on it again): %v", round, err)
		}
	}
}
