package driver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// LockFileName is the node lock's file in the directory of the CSI socket
// (the plugin directory kubelet dials, a host path every instance of the
// driver on the node shares), unless the lock file is named elsewhere.
const LockFileName = "driver.lock"

// DefaultLockPath is the node lock's path for a CSI endpoint: LockFileName
// beside the socket.
func DefaultLockPath(endpoint string) (string, error) {
	path, err := socketPath(endpoint)
	if err != nil {
		return "", err
	}
	return filepath.Join(filepath.Dir(path), LockFileName), nil
}

// NodeLock is the one driver of a node's claim on its CSI socket, its
// registration and its state directory: an exclusive flock(2) on a file
// every instance on the node opens. A second instance (a DaemonSet's
// surge pod) waits for it and touches nothing shared meanwhile; the
// kernel drops the lock when its holder exits, however it exits (SIGKILL
// included), and the waiter goes on at once.
//
// The file holds nothing secret, only who holds the lock (host name and
// process ID, for the waiter's log), and is never removed: a lock file
// that is removed and made again can be held twice (one holder on the old
// inode, one on the new). Acquire checks, once it holds the lock, that the
// path still names the file it locked, and starts again if it does not.
type NodeLock struct {
	fd   int
	path string
}

// AcquireNodeLock takes the node lock at path, waiting while another
// process holds it; waiting (if not nil) is told once per wait who holds
// it. It returns ctx's error if ctx ends first.
func AcquireNodeLock(ctx context.Context, path string, waiting func(holder string)) (*NodeLock, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, fmt.Errorf("node lock: %w", err)
	}
	for {
		fd, err := unix.Open(path, unix.O_RDWR|unix.O_CREAT|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0o600)
		if err != nil {
			return nil, fmt.Errorf("node lock %s: %w", path, err)
		}
		err = unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB)
		if errors.Is(err, unix.EWOULDBLOCK) {
			if waiting != nil {
				waiting(readHolder(fd))
			}
			if err = waitFlock(ctx, fd); errors.Is(err, errWaitEnded) {
				return nil, ctx.Err() // fd is closed once flock returns
			}
		}
		if err != nil {
			unix.Close(fd)
			return nil, fmt.Errorf("node lock %s: %w", path, err)
		}
		if same, err := sameFile(fd, path); err != nil || !same {
			// Removed or replaced while we waited: the lock that counts is
			// the one on the file the path names now.
			unix.Close(fd)
			continue
		}
		l := &NodeLock{fd: fd, path: path}
		l.writeHolder()
		return l, nil
	}
}

// errWaitEnded: the wait for the lock ended with its context.
var errWaitEnded = errors.New("wait for the node lock ended")

// waitFlock blocks in flock(2) until the lock is ours or ctx ends. On ctx's
// end it returns errWaitEnded at once and leaves the blocked call to close
// fd when it returns: the lock, if it came, goes with the file.
func waitFlock(ctx context.Context, fd int) error {
	done := make(chan error, 1)
	go func() { done <- unix.Flock(fd, unix.LOCK_EX) }()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		go func() { <-done; unix.Close(fd) }()
		return errWaitEnded
	}
}

func sameFile(fd int, path string) (bool, error) {
	var held, named unix.Stat_t
	if err := unix.Fstat(fd, &held); err != nil {
		return false, err
	}
	if err := unix.Lstat(path, &named); err != nil {
		return false, err
	}
	return held.Dev == named.Dev && held.Ino == named.Ino, nil
}

// writeHolder records who holds the lock, for a waiter's log; a failure
// only loses that line.
func (l *NodeLock) writeHolder() {
	host, _ := os.Hostname()
	holder := fmt.Sprintf("%s pid %d\n", host, os.Getpid())
	if err := unix.Ftruncate(l.fd, 0); err != nil {
		return
	}
	_, _ = unix.Pwrite(l.fd, []byte(holder), 0)
}

func readHolder(fd int) string {
	buf := make([]byte, 256)
	n, err := unix.Pread(fd, buf, 0)
	if err != nil || n <= 0 {
		return "unknown"
	}
	return strings.TrimSpace(string(buf[:n]))
}

// Path is the lock file's path.
func (l *NodeLock) Path() string { return l.path }

// Release lets the next instance go on. It removes the lock file first,
// while still holding it (and only if the path still names the file it
// holds), so an uninstalled driver leaves nothing behind: a waiter blocked
// on the removed file finds the path gone once it gets that lock, and
// starts again on a new file (AcquireNodeLock's check), so there is still
// one holder at a time.
func (l *NodeLock) Release() error {
	if l == nil || l.fd < 0 {
		return nil
	}
	if same, err := sameFile(l.fd, l.path); err == nil && same {
		_ = unix.Unlink(l.path)
	}
	err := unix.Close(l.fd) // closing the only descriptor drops the flock
	l.fd = -1
	return err
}
