package driver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// acquireAsync starts AcquireNodeLock in the background; waits receives
// each holder it was told it waits for.
func acquireAsync(ctx context.Context, path string) (got <-chan *NodeLock, failed <-chan error, waits <-chan string) {
	g, f, w := make(chan *NodeLock, 1), make(chan error, 1), make(chan string, 4)
	go func() {
		l, err := AcquireNodeLock(ctx, path, func(holder string) { w <- holder })
		if err != nil {
			f <- err
			return
		}
		g <- l
	}()
	return g, f, w
}

func mustAcquire(t *testing.T, path string) *NodeLock {
	t.Helper()
	l, err := AcquireNodeLock(context.Background(), path, func(holder string) {
		t.Errorf("waited for %s; the lock should be free", holder)
	})
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func waitHolder(t *testing.T, waits <-chan string) string {
	t.Helper()
	select {
	case h := <-waits:
		return h
	case <-time.After(10 * time.Second):
		t.Fatal("the second instance never started waiting")
		return ""
	}
}

func TestNodeLockSecondWaitsUntilTheFirstLetsGo(t *testing.T) {
	path := filepath.Join(t.TempDir(), "plugin", LockFileName)
	first := mustAcquire(t, path)
	got, failed, waits := acquireAsync(context.Background(), path)
	holder := waitHolder(t, waits)
	if want := fmt.Sprintf("pid %d", os.Getpid()); !strings.Contains(holder, want) {
		t.Errorf("waiter told the holder is %q, want it to name %q", holder, want)
	}
	select {
	case <-got:
		t.Fatal("the second instance got the lock while the first held it")
	case err := <-failed:
		t.Fatal(err)
	default:
	}
	if err := first.Release(); err != nil {
		t.Fatal(err)
	}
	var second *NodeLock
	select {
	case second = <-got:
	case err := <-failed:
		t.Fatal(err)
	case <-time.After(10 * time.Second):
		t.Fatal("the second instance did not take the lock the first let go")
	}
	if err := first.Release(); err != nil {
		t.Errorf("a second Release: %v", err)
	}
	// The second holds the file the path names now (the first removed its
	// own at release): a third instance waits for it.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	_, failed3, waits3 := acquireAsync(ctx, path)
	waitHolder(t, waits3)
	cancel()
	<-failed3
	if err := second.Release(); err != nil {
		t.Fatal(err)
	}
	// The last holder gone, nothing is left (an uninstall leaves no file).
	if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("lock file after the last release: %v", err)
	}
}

func TestNodeLockWaitEndsWithItsContextAndLeavesNothingHeld(t *testing.T) {
	path := filepath.Join(t.TempDir(), LockFileName)
	first := mustAcquire(t, path)
	ctx, cancel := context.WithCancel(context.Background())
	_, failed, waits := acquireAsync(ctx, path)
	waitHolder(t, waits)
	cancel()
	select {
	case err := <-failed:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("stopped waiter: %v, want context.Canceled", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the waiter did not stop with its context")
	}
	first.Release()
	// The abandoned wait may have been granted the lock as the first let
	// go; it must let it go at once, so a third instance gets it.
	got, failed, _ := acquireAsync(context.Background(), path)
	select {
	case third := <-got:
		third.Release()
	case err := <-failed:
		t.Fatal(err)
	case <-time.After(10 * time.Second):
		t.Fatal("the lock stayed held after the waiter gave up")
	}
}

// A lock file removed and made again while an instance waits (a person
// cleaning the plugin directory) must not let two instances hold it.
func TestNodeLockFileReplacedWhileWaiting(t *testing.T) {
	path := filepath.Join(t.TempDir(), LockFileName)
	first := mustAcquire(t, path)
	got, failed, waits := acquireAsync(context.Background(), path)
	waitHolder(t, waits)
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	third := mustAcquire(t, path) // a new file: free
	first.Release()
	// The waiter's flock on the old file succeeds, but that file is no
	// longer the lock: it must wait again, now for the third.
	waitHolder(t, waits)
	select {
	case <-got:
		t.Fatal("two instances hold the node lock (the waiter kept the removed file's lock)")
	case err := <-failed:
		t.Fatal(err)
	default:
	}
	third.Release()
	select {
	case second := <-got:
		second.Release()
	case err := <-failed:
		t.Fatal(err)
	case <-time.After(10 * time.Second):
		t.Fatal("the waiter did not take the lock")
	}
}

func TestNodeLockRefusesASymlink(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, LockFileName)
	if err := os.Symlink(filepath.Join(dir, "elsewhere"), path); err != nil {
		t.Fatal(err)
	}
	if l, err := AcquireNodeLock(context.Background(), path, nil); err == nil {
		l.Release()
		t.Fatal("the lock followed a symlink")
	}
	if _, err := os.Stat(filepath.Join(dir, "elsewhere")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a file was made through the symlink: %v", err)
	}
}

func TestDefaultLockPath(t *testing.T) {
	for _, tc := range []struct{ endpoint, want string }{
		{"unix:///csi/csi.sock", "/csi/driver.lock"},
		{"unix:/var/lib/kubelet/plugins/x/csi.sock", "/var/lib/kubelet/plugins/x/driver.lock"},
		{"tcp://127.0.0.1:1", ""},
		{"unix://", ""},
	} {
		got, err := DefaultLockPath(tc.endpoint)
		if got != tc.want || (err == nil) != (tc.want != "") {
			t.Errorf("DefaultLockPath(%q) = %q, %v; want %q", tc.endpoint, got, err, tc.want)
		}
	}
}
