package storage

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// newStore opens a store on a fresh tmpfs; it needs root.
func newStore(t testing.TB, opts Options) *Filesystem {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount tmpfs")
	}
	root := t.TempDir()
	s, err := Open(filepath.Join(root, "state"), opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for _, m := range []string{"a", "b"} {
			_ = unix.Unmount(filepath.Join(root, "target-"+m), unix.MNT_DETACH)
		}
		entries, _ := os.ReadDir(filepath.Join(s.root, "volumes"))
		for _, e := range entries {
			_ = unix.Unmount(filepath.Join(s.root, "volumes", e.Name(), "fs"), unix.MNT_DETACH)
		}
		_ = unix.Unmount(s.root, unix.MNT_DETACH)
	})
	return s
}

func TestOpenPutsStateOnTmpfs(t *testing.T) {
	s := newStore(t, Options{})
	var st unix.Statfs_t
	if err := unix.Statfs(s.Root(), &st); err != nil || st.Type != unix.TMPFS_MAGIC {
		t.Fatalf("state dir is not tmpfs: %v type %x", err, st.Type)
	}
	// Opening again (a restart) keeps what is there.
	if err := s.WriteMetadata("v1", record{ID: "v1"}); err != nil {
		t.Fatal(err)
	}
	s2, err := Open(s.Root(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	if ms, _ := s2.ListMetadata(); len(ms) != 1 || decode(t, ms[0]).ID != "v1" {
		t.Fatalf("after reopen: %s", ms)
	}
}

func TestWriteFilesSwapsAtomically(t *testing.T) {
	s := newStore(t, Options{})
	const id = "vol"
	if err := s.CreateVolume(id, 1234); err != nil {
		t.Fatal(err)
	}
	gen := func(n int) []File {
		v := []byte(fmt.Sprint(n))
		return []File{{Path: "a", Mode: 0o440, Data: v}, {Path: "sub/b", Mode: 0o400, Data: v}}
	}
	if err := s.WriteFiles(id, 1234, gen(0)); err != nil {
		t.Fatal(err)
	}
	dir := s.DataDir(id)
	var stop atomic.Bool
	var torn atomic.Int64
	var wg sync.WaitGroup
	wg.Go(func() {
		for !stop.Load() {
			// A reader that resolves ..data once sees one generation.
			real, err := filepath.EvalSymlinks(filepath.Join(dir, "..data"))
			if err != nil {
				continue
			}
			a, err1 := os.ReadFile(filepath.Join(real, "a"))
			b, err2 := os.ReadFile(filepath.Join(real, "sub/b"))
			if err1 == nil && err2 == nil && !bytes.Equal(a, b) {
				torn.Add(1)
			}
		}
	})
	for n := 1; n <= 300; n++ {
		if err := s.WriteFiles(id, 1234, gen(n)); err != nil {
			t.Fatal(err)
		}
	}
	stop.Store(true)
	wg.Wait()
	if torn.Load() != 0 {
		t.Fatalf("%d torn reads", torn.Load())
	}
	got, err := os.ReadFile(filepath.Join(dir, "sub/b"))
	if err != nil || string(got) != "300" {
		t.Fatalf("final content %q %v", got, err)
	}
	entries, _ := os.ReadDir(dir)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if len(names) != 4 { // a, sub, ..data and one version directory
		t.Fatalf("old versions left behind: %v", names)
	}
	st, _ := os.Stat(filepath.Join(dir, "sub/b"))
	if sys := st.Sys().(*syscall.Stat_t); st.Mode().Perm() != 0o400 || sys.Gid != 1234 || sys.Uid != 0 {
		t.Fatalf("mode %o owner %d:%d", st.Mode().Perm(), sys.Uid, sys.Gid)
	}
	// A name dropped from the set disappears.
	if err := s.WriteFiles(id, 1234, []File{{Path: "a", Mode: 0o440, Data: []byte("x")}}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(filepath.Join(dir, "sub")); !os.IsNotExist(err) {
		t.Fatalf("dropped name still present: %v", err)
	}
}

func TestWriteFilesRefusesOversizedSets(t *testing.T) {
	s := newStore(t, Options{MaxVolumeBytes: 4096, MaxFiles: 4})
	if err := s.CreateVolume("v", -1); err != nil {
		t.Fatal(err)
	}
	big := []File{{Path: "a", Mode: 0o440, Data: bytes.Repeat([]byte("x"), 4097)}}
	if err := s.WriteFiles("v", -1, big); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("oversized: %v", err)
	}
	many := make([]File, 5)
	for i := range many {
		many[i] = File{Path: fmt.Sprint("f", i), Mode: 0o440}
	}
	if err := s.WriteFiles("v", -1, many); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("too many files: %v", err)
	}
	if err := s.WriteFiles("v", -1, []File{{Path: "../x", Mode: 0o440}}); !errors.Is(err, ErrInvalidPath) {
		t.Fatalf("escaping name: %v", err)
	}
}

func TestMountIsReadOnlyAndUnmountCleansUp(t *testing.T) {
	s := newStore(t, Options{})
	target := filepath.Join(filepath.Dir(s.Root()), "target-a")
	if err := s.CreateVolume("v", -1); err != nil {
		t.Fatal(err)
	}
	if err := s.WriteFiles("v", -1, []File{{Path: "k", Mode: 0o444, Data: []byte("v")}}); err != nil {
		t.Fatal(err)
	}
	if err := s.Mount("v", target); err != nil {
		t.Fatal(err)
	}
	if err := s.Mount("v", target); err != nil { // idempotent
		t.Fatal(err)
	}
	if !s.IsMounted(target) {
		t.Fatal("not mounted")
	}
	if err := os.WriteFile(filepath.Join(target, "new"), nil, 0o600); !errors.Is(err, syscall.EROFS) {
		t.Fatalf("write into the mount: %v", err)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(target, &st); err != nil {
		t.Fatal(err)
	}
	for _, f := range []int64{unix.ST_RDONLY, unix.ST_NOSUID, unix.ST_NODEV, unix.ST_NOEXEC} {
		if st.Flags&f == 0 {
			t.Errorf("mount flags %x lack %x", st.Flags, f)
		}
	}
	if err := s.UnmountTarget(target); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(target); !os.IsNotExist(err) {
		t.Fatalf("target left: %v", err)
	}
	if err := s.UnmountTarget(target); err != nil {
		t.Fatalf("second unmount: %v", err)
	}
	if err := s.DeleteVolume("v"); err != nil {
		t.Fatal(err)
	}
	if data, _ := os.ReadFile("/proc/self/mountinfo"); strings.Contains(string(data), s.volumeDir("v")) {
		t.Fatal("volume tmpfs still mounted")
	}
}

// record stands for what the store's owners keep in it: the store never
// looks inside.
type record struct {
	ID    string `json:"id"`
	Token string `json:"token,omitempty"`
}

func decode(t testing.TB, raw json.RawMessage) record {
	t.Helper()
	var r record
	if err := json.Unmarshal(raw, &r); err != nil {
		t.Fatalf("record %s: %v", raw, err)
	}
	return r
}

// Records hold secrets (a lease's handle): only the driver reads them.
func TestRecordsAreReadableOnlyByTheDriver(t *testing.T) {
	s := newStore(t, Options{})
	if err := s.PutRevocation("a-lease", record{ID: "a-lease"}); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(revocationPath(s.root, "a-lease"))
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("queue entry mode %v (%v), want 0600", st.Mode().Perm(), err)
	}
}

func BenchmarkWriteFiles(b *testing.B) {
	s := newStore(b, Options{})
	if err := s.CreateVolume("v", 1000); err != nil {
		b.Fatal(err)
	}
	files := []File{
		{Path: "username", Mode: 0o440, Data: bytes.Repeat([]byte("u"), 256)},
		{Path: "password", Mode: 0o440, Data: bytes.Repeat([]byte("p"), 256)},
		{Path: "dsn", Mode: 0o440, Data: bytes.Repeat([]byte("d"), 256)},
	}
	for b.Loop() {
		if err := s.WriteFiles("v", 1000, files); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkWriteMetadata(b *testing.B) {
	s := newStore(b, Options{})
	m := map[string]any{"volumeID": "v", "targetPath": "/var/lib/kubelet/pods/x/volumes/kubernetes.io~csi/v/mount",
		"state": "published", "attributes": map[string]string{"secretProviderClass": "db"},
		"pod": map[string]string{"namespace": "ns", "name": "pod"}}
	for b.Loop() {
		if err := s.WriteMetadata("v", m); err != nil {
			b.Fatal(err)
		}
	}
}

func TestOpenExistingNeverMounts(t *testing.T) {
	s := newStore(t, Options{})
	if _, err := OpenExisting(s.Root()); err != nil {
		t.Fatalf("a driver's state: %v", err)
	}
	plain := t.TempDir()
	if _, err := OpenExisting(plain); err == nil {
		t.Fatal("a plain directory was taken for driver state")
	}
	var st unix.Statfs_t
	if err := unix.Statfs(plain, &st); err != nil || st.Type == unix.TMPFS_MAGIC {
		t.Fatalf("OpenExisting mounted something: %v %x", err, st.Type)
	}
}

func TestReleaseLeavesNothingOnlyWhenEmpty(t *testing.T) {
	root := filepath.Join(t.TempDir(), "state")
	f, err := Open(root, Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(root, unix.MNT_DETACH) })
	if err := f.PutRevocation("l1", record{ID: "l1"}); err != nil {
		t.Fatal(err)
	}
	if released, err := f.Release(); err != nil || released {
		t.Fatalf("Release with a pending revocation = %v, %v; want kept", released, err)
	}
	if mounted, _ := f.mounter.IsMountPoint(root); !mounted {
		t.Fatal("state tmpfs unmounted while a revocation was pending")
	}
	if err := f.DeleteRevocation("l1"); err != nil {
		t.Fatal(err)
	}
	if released, err := f.Release(); err != nil || !released {
		t.Fatalf("Release of an empty store = %v, %v", released, err)
	}
	if mounted, _ := f.mounter.IsMountPoint(root); mounted {
		t.Fatal("state tmpfs still mounted after Release")
	}
	if entries, err := os.ReadDir(root); err != nil || len(entries) != 0 {
		t.Fatalf("state directory holds %v (%v)", entries, err)
	}
}

// The lease socket at a volume's root is no file of the volume's: writes
// keep it, emptying the volume keeps it, and no file may take its name.
func TestWriteFilesKeepsTheLeaseSocket(t *testing.T) {
	s := newStore(t, Options{})
	if err := s.CreateVolume("v1", -1); err != nil {
		t.Fatal(err)
	}
	if err := s.WriteFiles("v1", -1, []File{{Path: "password", Mode: 0o440, Data: []byte("x")}}); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(s.DataDir("v1"), SocketName)
	if err := unix.Mknod(sock, unix.S_IFSOCK|0o660, 0); err != nil {
		t.Fatal(err)
	}
	if err := s.WriteFiles("v1", -1, []File{{Path: "username", Mode: 0o440, Data: []byte("u")}}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(sock); err != nil {
		t.Fatalf("a write removed the socket: %v", err)
	}
	if err := s.WriteFiles("v1", -1, nil); err != nil {
		t.Fatal(err)
	}
	entries, _ := os.ReadDir(s.DataDir("v1"))
	if len(entries) != 1 || entries[0].Name() != SocketName {
		var got []string
		for _, e := range entries {
			got = append(got, e.Name())
		}
		t.Fatalf("emptied volume holds %v, want only the socket", got)
	}
	err := s.WriteFiles("v1", -1, []File{{Path: SocketName, Mode: 0o440, Data: []byte("x")}})
	if !errors.Is(err, ErrInvalidPath) {
		t.Fatalf("a file named like the socket: %v", err)
	}
}
