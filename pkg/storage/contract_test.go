package storage_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/ephemeral-secrets/csi-driver/pkg/storage"
	"github.com/ephemeral-secrets/csi-driver/pkg/storage/memory"
)

// rawStore is what both stores are: the records, the volumes' files and
// mounts, and the removal of orphans (what pkg/lease's NewStore takes).
type rawStore interface {
	storage.RecordStore
	storage.DataWriter
	RemoveOrphans() (int, error)
	// WriteLegacyLease plants a record as drivers before keyed lease
	// records wrote it.
	WriteLegacyLease(id string, v any) error
}

// subject is one store under the contract, with the ways a pod would see
// a target.
type subject struct {
	store rawStore
	// target names a mount point whose parent exists.
	target func(name string) string
	// read and list read what target shows, as a pod does.
	read func(target, path string) ([]byte, error)
	list func(target, dir string) ([]string, error)
}

// stores are the implementations held to one contract: the Filesystem
// (needs root: real tmpfs and bind mounts) and the in-memory store.
var stores = []struct {
	name string
	open func(t *testing.T, opts storage.Options) subject
}{
	{"filesystem", openFilesystem},
	{"memory", func(t *testing.T, opts storage.Options) subject {
		s := memory.New(opts)
		return subject{store: s, target: func(name string) string { return "/pods/uid/volumes/" + name + "/mount" },
			read: s.ReadFile, list: s.ReadDir}
	}},
}

func openFilesystem(t *testing.T, opts storage.Options) subject {
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount tmpfs")
	}
	root := t.TempDir()
	s, err := storage.Open(filepath.Join(root, "state"), opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unmountUnder(root) })
	return subject{
		store:  s,
		target: func(name string) string { return filepath.Join(root, "target-"+name) },
		read:   func(target, p string) ([]byte, error) { return os.ReadFile(filepath.Join(target, p)) },
		list: func(target, dir string) ([]string, error) {
			entries, err := os.ReadDir(filepath.Join(target, dir))
			var names []string
			for _, e := range entries {
				if !strings.HasPrefix(e.Name(), "..") { // the atomic writer's versions and link
					names = append(names, e.Name())
				}
			}
			return names, err
		},
	}
}

// unmountUnder unmounts everything mounted under dir, deepest first.
func unmountUnder(dir string) {
	data, _ := os.ReadFile("/proc/self/mountinfo")
	var points []string
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Fields(line); len(f) > 4 && strings.HasPrefix(f[4], dir+"/") {
			points = append(points, f[4])
		}
	}
	sort.Sort(sort.Reverse(sort.StringSlice(points)))
	for _, p := range points {
		_ = unix.Unmount(p, unix.MNT_DETACH)
	}
}

// record stands for what the store's owners keep in it: the store never
// looks inside.
type record struct {
	ID    string `json:"id"`
	Token string `json:"token,omitempty"`
}

func ids(t *testing.T, raw []json.RawMessage) []string {
	t.Helper()
	var out []string
	for _, r := range raw {
		var rec record
		if err := json.Unmarshal(r, &rec); err != nil {
			t.Fatalf("record %s: %v", r, err)
		}
		out = append(out, rec.ID)
	}
	slices.Sort(out)
	return out
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// contract is what every store must do, one case a concern.
var contract = []struct {
	name string
	run  func(t *testing.T, s subject)
}{
	{"named records", func(t *testing.T, s subject) {
		var r record
		if err := s.store.ReadRecord("seen", &r); !errors.Is(err, storage.ErrVolumeNotFound) {
			t.Fatalf("absent record: %v", err)
		}
		must(t, s.store.WriteRecord("seen", record{ID: "a"}))
		must(t, s.store.WriteRecord("seen", record{ID: "b"}))
		if err := s.store.ReadRecord("seen", &r); err != nil || r.ID != "b" {
			t.Fatalf("read back %+v, %v", r, err)
		}
		for _, bad := range []string{"", "../x", "a/b", "/abs"} {
			if err := s.store.WriteRecord(bad, r); !errors.Is(err, storage.ErrInvalidPath) {
				t.Errorf("record name %q: %v", bad, err)
			}
			if err := s.store.ReadRecord(bad, &r); !errors.Is(err, storage.ErrInvalidPath) {
				t.Errorf("record name %q read: %v", bad, err)
			}
		}
	}},
	{"metadata", func(t *testing.T, s subject) {
		var r record
		if err := s.store.ReadMetadata("v", &r); !errors.Is(err, storage.ErrVolumeNotFound) {
			t.Fatalf("absent metadata: %v", err)
		}
		for _, id := range []string{"v", "w/odd id", "v"} {
			must(t, s.store.WriteMetadata(id, record{ID: id, Token: "t"}))
		}
		if err := s.store.ReadMetadata("w/odd id", &r); err != nil || r.ID != "w/odd id" {
			t.Fatalf("read back %+v, %v", r, err)
		}
		ms, err := s.store.ListMetadata()
		if got := ids(t, ms); err != nil || fmt.Sprint(got) != "[v w/odd id]" {
			t.Fatalf("listed %v, %v", got, err)
		}
	}},
	{"lease records are kept per lease", func(t *testing.T, s subject) {
		if err := s.store.WriteLease("unknown", "l", record{ID: "l"}); err == nil {
			t.Error("a lease recorded for a volume with no directory")
		}
		must(t, s.store.WriteMetadata("v", record{ID: "v"})) // makes the volume's directory
		for _, id := range []string{"old", "new"} {
			must(t, s.store.WriteLease("v", id, record{ID: id, Token: id}))
		}
		var l record
		if err := s.store.ReadLease("v", "old", &l); err != nil || l.ID != "old" || l.Token != "old" {
			t.Fatalf("lease old: %+v, %v", l, err)
		}
		if ls, err := s.store.ListLeases("v"); err != nil || fmt.Sprint(ids(t, ls)) != "[new old]" {
			t.Fatalf("records %s, %v; want both", ls, err)
		}
		must(t, s.store.DeleteLease("v", "old"))
		must(t, s.store.DeleteLease("v", "old"))
		if err := s.store.ReadLease("v", "old", &l); !errors.Is(err, storage.ErrVolumeNotFound) {
			t.Fatalf("deleted lease read back: %v", err)
		}
		// A volume recorded by an earlier driver keeps its one lease in a
		// record of its own, listed with the others.
		if err := s.store.ReadLegacyLease("v", &l); !errors.Is(err, storage.ErrVolumeNotFound) {
			t.Fatalf("absent legacy record: %v", err)
		}
		must(t, s.store.WriteLegacyLease("v", record{ID: "legacy"}))
		if err := s.store.ReadLegacyLease("v", &l); err != nil || l.ID != "legacy" {
			t.Fatalf("legacy record: %+v, %v", l, err)
		}
		if ls, _ := s.store.ListLeases("v"); fmt.Sprint(ids(t, ls)) != "[legacy new]" {
			t.Fatalf("legacy record not listed: %s", ls)
		}
		must(t, s.store.DeleteLegacyLease("v"))
		must(t, s.store.DeleteLegacyLease("v"))
		if ls, _ := s.store.ListLeases("v"); fmt.Sprint(ids(t, ls)) != "[new]" {
			t.Fatalf("after deleting the legacy record: %s", ls)
		}
		if ls, err := s.store.ListLeases("unknown"); err != nil || len(ls) != 0 {
			t.Fatalf("unknown volume: %s, %v", ls, err)
		}
	}},
	{"revocation queue", func(t *testing.T, s subject) {
		for _, id := range []string{"b-lease", "a-lease", "a-lease"} {
			must(t, s.store.PutRevocation(id, record{ID: id}))
		}
		if q, err := s.store.ListRevocations(); err != nil || fmt.Sprint(ids(t, q)) != "[a-lease b-lease]" {
			t.Fatalf("queue %s, %v", q, err)
		}
		must(t, s.store.DeleteRevocation("a-lease"))
		must(t, s.store.DeleteRevocation("a-lease"))
		if q, _ := s.store.ListRevocations(); fmt.Sprint(ids(t, q)) != "[b-lease]" {
			t.Fatalf("after delete: %s", q)
		}
	}},
	{"orphans", func(t *testing.T, s subject) {
		must(t, s.store.CreateVolume("orphan", -1)) // a crash before its metadata
		must(t, s.store.CreateVolume("kept", -1))
		must(t, s.store.WriteMetadata("kept", record{ID: "kept"}))
		must(t, s.store.WriteLease("kept", "l", record{ID: "l"}))
		if n, err := s.store.RemoveOrphans(); err != nil || n != 1 {
			t.Fatalf("removed %d orphans, %v; want 1", n, err)
		}
		if n, err := s.store.RemoveOrphans(); err != nil || n != 0 {
			t.Fatalf("second pass removed %d, %v", n, err)
		}
		if err := s.store.WriteFiles("orphan", -1, nil); err == nil {
			t.Error("the orphan's tmpfs is still there to write")
		}
		if ls, _ := s.store.ListLeases("kept"); len(ls) != 1 {
			t.Errorf("the recorded volume lost its lease record: %s", ls)
		}
	}},
	{"files replace as one set", func(t *testing.T, s subject) {
		if err := s.store.WriteFiles("v", -1, []storage.File{{Path: "a", Mode: 0o440}}); err == nil {
			t.Error("files written into a volume never created")
		}
		target := s.target("a")
		if err := s.store.Mount("v", target); err == nil {
			t.Error("a volume never created was mounted")
		}
		must(t, s.store.CreateVolume("v", 1234))
		must(t, s.store.CreateVolume("v", 1234))
		must(t, s.store.WriteFiles("v", 1234, []storage.File{
			{Path: "username", Mode: 0o440, Data: []byte("u1")}, {Path: "tasks/t1/password", Mode: 0o440, Data: []byte("p1")},
		}))
		if s.store.IsMounted(target) {
			t.Fatal("mounted before Mount")
		}
		must(t, s.store.Mount("v", target))
		must(t, s.store.Mount("v", target))
		if !s.store.IsMounted(target) {
			t.Fatal("not mounted")
		}
		if got, err := s.read(target, "tasks/t1/password"); err != nil || string(got) != "p1" {
			t.Fatalf("read %q, %v", got, err)
		}
		// The next set replaces the whole of the last: a name dropped goes.
		must(t, s.store.WriteFiles("v", 1234, []storage.File{{Path: "username", Mode: 0o440, Data: []byte("u2")}}))
		if got, err := s.read(target, "username"); err != nil || string(got) != "u2" {
			t.Fatalf("after the second write: %q, %v", got, err)
		}
		if names, err := s.list(target, "."); err != nil || fmt.Sprint(names) != "[username]" {
			t.Fatalf("the target shows %v, %v", names, err)
		}
		if _, err := s.read(target, "tasks/t1/password"); !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("a dropped file: %v", err)
		}
		// An empty set empties the volume.
		must(t, s.store.WriteFiles("v", 1234, nil))
		if names, err := s.list(target, "."); err != nil || len(names) != 0 {
			t.Fatalf("the emptied volume shows %v, %v", names, err)
		}
		// Deleted, the volume's records go; a target still mounted keeps
		// what it showed until it is unmounted.
		must(t, s.store.WriteFiles("v", 1234, []storage.File{{Path: "username", Mode: 0o440, Data: []byte("u3")}}))
		must(t, s.store.WriteMetadata("v", record{ID: "v"}))
		must(t, s.store.WriteLease("v", "l", record{ID: "l"}))
		must(t, s.store.DeleteVolume("v"))
		must(t, s.store.DeleteVolume("v"))
		var r record
		if err := s.store.ReadMetadata("v", &r); !errors.Is(err, storage.ErrVolumeNotFound) {
			t.Errorf("metadata of a deleted volume: %v", err)
		}
		if ls, _ := s.store.ListLeases("v"); len(ls) != 0 {
			t.Errorf("lease records of a deleted volume: %s", ls)
		}
		if got, err := s.read(target, "username"); err != nil || string(got) != "u3" {
			t.Errorf("the target of a deleted volume shows %q, %v", got, err)
		}
		must(t, s.store.UnmountTarget(target))
		must(t, s.store.UnmountTarget(target))
		if s.store.IsMounted(target) {
			t.Error("mounted after UnmountTarget")
		}
		if _, err := s.read(target, "username"); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("an unmounted target still shows a file: %v", err)
		}
	}},
	{"files are checked", func(t *testing.T, s subject) {
		must(t, s.store.CreateVolume("v", -1))
		for name, tc := range map[string]struct {
			files []storage.File
			want  error
		}{
			"too large":         {[]storage.File{{Path: "a", Data: bytes.Repeat([]byte("x"), 4097)}}, storage.ErrTooLarge},
			"too many":          {[]storage.File{{Path: "a"}, {Path: "b"}, {Path: "c"}, {Path: "d"}, {Path: "e"}}, storage.ErrTooLarge},
			"escaping":          {[]storage.File{{Path: "../x"}}, storage.ErrInvalidPath},
			"absolute":          {[]storage.File{{Path: "/etc/x"}}, storage.ErrInvalidPath},
			"the socket's name": {[]storage.File{{Path: storage.SocketName}}, storage.ErrInvalidPath},
		} {
			if err := s.store.WriteFiles("v", -1, tc.files); !errors.Is(err, tc.want) {
				t.Errorf("%s: %v, want %v", name, err, tc.want)
			}
		}
		if err := s.store.WriteFiles("v", -1, []storage.File{{Path: "a", Mode: 0o440}, {Path: "a/b", Mode: 0o440}}); err == nil {
			t.Error("a file and a directory of one name were written")
		}
	}},
}

// TestStoreContract holds every store to the same contract.
func TestStoreContract(t *testing.T) {
	for _, st := range stores {
		t.Run(st.name, func(t *testing.T) {
			for _, c := range contract {
				t.Run(c.name, func(t *testing.T) {
					c.run(t, st.open(t, storage.Options{MaxVolumeBytes: 4096, MaxFiles: 4}))
				})
			}
		})
	}
}
