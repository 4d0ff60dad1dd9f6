package lease

import (
	"bytes"
	"encoding/json"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/ephemeral-secrets/csi-driver/pkg/lease/revocation"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/storage"
)

// goldenState is a state directory written by the driver before the
// records moved from pkg/storage to this package: a published volume with
// every metadata field and two task leases, a withdrawn volume, two lease
// records, two queued revocations and a node record.
const goldenState = "testdata/state"

// TestRecordsKeepTheirBytes: every record of the golden state decodes
// into the type that owns it now and encodes back to the same bytes, so a
// driver upgraded over a live node reads its state and writes the same
// format. It needs no root.
func TestRecordsKeepTheirBytes(t *testing.T) {
	n := 0
	err := filepath.WalkDir(goldenState, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		var v any
		switch name := d.Name(); {
		case name == "meta.json":
			v = &Metadata{}
		case strings.HasPrefix(name, "lease-"):
			v = &provider.Lease{}
		case filepath.Base(filepath.Dir(path)) == "revocations":
			v = &revocation.Entry{}
		default:
			return nil // a node record: the store's caller's map
		}
		dec := json.NewDecoder(bytes.NewReader(data))
		dec.DisallowUnknownFields()
		if err := dec.Decode(v); err != nil {
			t.Errorf("%s: %v", path, err)
			return nil
		}
		again, err := json.Marshal(v)
		if err != nil {
			return err
		}
		if !bytes.Equal(again, data) {
			t.Errorf("%s re-encodes differently:\n got %s\nwant %s", path, again, data)
		}
		n++
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if n != 6 {
		t.Fatalf("checked %d records, want the golden state's 6", n)
	}
}

// TestRecordsWrittenBeforeTheMoveStillRead reads the golden state through
// the real store and this package's Store, as a restarted driver does.
func TestRecordsWrittenBeforeTheMoveStillRead(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount the state tmpfs")
	}
	root := filepath.Join(t.TempDir(), "state")
	fsys, err := storage.Open(root, storage.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(root, unix.MNT_DETACH) })
	if err := os.CopyFS(root, os.DirFS(goldenState)); err != nil {
		t.Fatal(err)
	}
	s := NewStore(fsys)
	ids, err := s.ListVolumes()
	if err != nil || len(ids) != 2 || ids[0] != "csi-0123abcd" || ids[1] != "csi-withdrawn" {
		t.Fatalf("volumes %v, %v", ids, err)
	}
	m, err := s.ReadMetadata("csi-0123abcd")
	if err != nil {
		t.Fatal(err)
	}
	if m.State != StatePublished || m.LeaseID != "L-CURRENT" || m.Pod.Name != "web-0" || m.GrantTTL.Hours() != 1 ||
		len(m.Tasks) != 2 || m.Tasks["job-1"].State != StateIssuing || m.Tasks["job-1"].LeaseID != "L-TASK1" {
		t.Fatalf("metadata read back as %+v", m)
	}
	if w, err := s.ReadMetadata("csi-withdrawn"); err != nil || w.State != StateWithdrawn {
		t.Fatalf("withdrawn volume read back as %+v, %v", w, err)
	}
	l, err := s.ReadLease("csi-0123abcd")
	if err != nil || l.ID != "L-CURRENT" || l.Handle["role"] != "esc_shop_web_0" || l.RenewAt.IsZero() {
		t.Fatalf("current lease %+v, %v", l, err)
	}
	ls, err := s.ListLeases("csi-0123abcd")
	if err != nil || len(ls) != 2 || ls[0].ID != "L-CURRENT" || ls[1].ID != "L-TASK1" {
		t.Fatalf("lease records %+v, %v", ls, err)
	}
	q, err := s.ListRevocations()
	if err != nil || len(q) != 2 || q[0].Lease.ID != "L-EARLY" || q[1].Lease.ID != "L-OLD" ||
		q[1].Attempts != 2 || q[1].NotBefore.IsZero() || q[1].Task != "job-0" {
		t.Fatalf("revocation queue %+v, %v", q, err)
	}
	// Written back, the metadata is the same bytes.
	if err := s.WriteMetadata(m); err != nil {
		t.Fatal(err)
	}
	rel := "volumes/cb26b3af67cf1cf06163f974d9def718/meta.json"
	got, _ := os.ReadFile(filepath.Join(root, rel))
	want, _ := os.ReadFile(filepath.Join(goldenState, rel))
	if !bytes.Equal(got, want) {
		t.Fatalf("metadata rewritten as\n%s\nwant\n%s", got, want)
	}
}
