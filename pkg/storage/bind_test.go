package storage

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
	mount "k8s.io/mount-utils"
)

// mountOpts returns the per-mount options of the mount at path.
func mountOpts(t *testing.T, path string) []string {
	t.Helper()
	infos, err := mount.ParseMountInfo("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	var opts []string
	for _, m := range infos {
		if m.MountPoint == path {
			opts = m.MountOptions // the last (top) mount wins
		}
	}
	if opts == nil {
		t.Fatalf("nothing mounted on %s", path)
	}
	return opts
}

// TestMountReadOnlyInEveryPeer models kubelet's pods directory: a shared
// mount whose peers are the host's and the pod's views. The volume must be
// read-only in every peer, not only where the driver mounted it.
func TestMountReadOnlyInEveryPeer(t *testing.T) {
	s := newStore(t, Options{})
	base := t.TempDir()
	pods, peer := filepath.Join(base, "pods"), filepath.Join(base, "peer")
	for _, d := range []string{pods, peer} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := unix.Mount(pods, pods, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(pods, unix.MNT_DETACH) })
	if err := unix.Mount("", pods, "", unix.MS_SHARED, ""); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(pods, peer, "", unix.MS_BIND, ""); err != nil { // same peer group
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(peer, unix.MNT_DETACH) })

	if err := s.CreateVolume("v1", -1); err != nil {
		t.Fatal(err)
	}
	target := filepath.Join(pods, "target")
	if err := s.Mount("v1", target); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = unix.Unmount(target, unix.MNT_DETACH)
		_ = unix.Unmount(filepath.Join(peer, "target"), unix.MNT_DETACH)
	})
	for _, p := range []string{target, filepath.Join(peer, "target")} {
		opts := mountOpts(t, p)
		for _, want := range []string{"ro", "nosuid", "nodev", "noexec"} {
			if !contains(opts, want) {
				t.Errorf("%s mounted %s, want %s", p, strings.Join(opts, ","), want)
			}
		}
	}
	if err := os.WriteFile(filepath.Join(peer, "target", "planted"), []byte("x"), 0o600); err == nil {
		t.Error("wrote into the volume through a peer mount")
	}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}
