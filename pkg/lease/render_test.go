package lease

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/audit"
	"github.com/ephemeral-secrets/csi-driver/pkg/lease/revocation"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

var update = flag.Bool("update", false, "write testdata/rendered.golden from this code")

// renderedGolden is what the golden state renders to: the JSON that
// `ephemeral-secrets-csi inventory --json` prints, what the lease socket
// answers of each volume (GET /v1/lease), and the audit records of its
// leases, as the driver wrote them before these shapes were rendered from
// one credential record (pkg/credential).
const renderedGolden = "testdata/rendered.golden"

// goldenReader reads the golden state's records as they are on disk,
// without the store (no tmpfs, no root).
type goldenReader struct {
	t    *testing.T
	meta map[string]Metadata
}

func readGolden(t *testing.T) goldenReader {
	r := goldenReader{t: t, meta: map[string]Metadata{}}
	files, _ := filepath.Glob(filepath.Join(goldenState, "volumes", "*", "meta.json"))
	for _, f := range files {
		var m Metadata
		decodeFile(t, f, &m)
		r.meta[m.VolumeID] = m
	}
	if len(r.meta) != 2 {
		t.Fatalf("golden state: %d volumes, want 2", len(r.meta))
	}
	return r
}

func decodeFile(t *testing.T, name string, v any) {
	t.Helper()
	b, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, v); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
}

func (r goldenReader) ListVolumes() ([]string, error) {
	var ids []string
	for id := range r.meta {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return ids, nil
}

func (r goldenReader) ReadMetadata(id string) (Metadata, error) { return r.meta[id], nil }

func (r goldenReader) ReadLease(id string) (provider.Lease, error) {
	ls, _ := r.ListLeases(id)
	for _, l := range ls {
		if l.ID == r.meta[id].LeaseID {
			return l, nil
		}
	}
	return provider.Lease{}, errors.New("no current lease")
}

func (r goldenReader) ListLeases(id string) ([]provider.Lease, error) {
	var out []provider.Lease
	files, _ := filepath.Glob(filepath.Join(goldenState, "volumes", "*", "lease-*.json"))
	for _, f := range files {
		var l provider.Lease
		decodeFile(r.t, f, &l)
		out = append(out, l)
	}
	slices.SortFunc(out, func(a, b provider.Lease) int { return strings.Compare(a.ID, b.ID) })
	return out, nil
}

func (r goldenReader) ListRevocations() ([]revocation.Entry, error) {
	var out []revocation.Entry
	files, _ := filepath.Glob(filepath.Join(goldenState, "revocations", "*.json"))
	for _, f := range files {
		var e revocation.Entry
		decodeFile(r.t, f, &e)
		out = append(out, e)
	}
	slices.SortFunc(out, func(a, b revocation.Entry) int { return strings.Compare(a.Lease.ID, b.Lease.ID) })
	return out, nil
}

// TestRenderingsKeepTheirBytes: the inventory, the lease socket's answers
// and the audit records rendered from the golden state are the bytes of
// renderedGolden: a field renamed, dropped or moved fails it. It needs no
// root.
func TestRenderingsKeepTheirBytes(t *testing.T) {
	r := readGolden(t)
	var out bytes.Buffer

	out.WriteString("# ephemeral-secrets-csi inventory --json\n")
	// A volume whose issue is under way: its pending lease is shown.
	pending := r.meta["csi-0123abcd"]
	pending.VolumeID, pending.LeaseID, pending.State, pending.Tasks = "csi-pending", "", StateIssuing, nil
	r.meta[pending.VolumeID] = pending
	inv, err := ReadInventory(r)
	if err != nil {
		t.Fatal(err)
	}
	enc := json.NewEncoder(&out)
	enc.SetIndent("", "  ")
	if err := enc.Encode(inv); err != nil {
		t.Fatal(err)
	}

	out.WriteString("# GET /v1/lease\n")
	withdrawn := r.meta["csi-0123abcd"]
	withdrawn.State = StateWithdrawn
	for _, m := range []Metadata{r.meta["csi-0123abcd"], r.meta["csi-withdrawn"], withdrawn} {
		if err := json.NewEncoder(&out).Encode(infoOf(m)); err != nil {
			t.Fatal(err)
		}
	}

	out.WriteString("# audit\n")
	log := audit.New(&out)
	at := time.Date(2026, 12, 7, 7, 30, 0, 0, time.UTC)
	m := r.meta["csi-0123abcd"]
	cur, err := r.ReadLease(m.VolumeID)
	if err != nil {
		t.Fatal(err)
	}
	for _, rec := range []audit.Record{
		withExpiry(withStage(recordFor(m, cur), audit.Issue), cur.ExpiresAt),
		withStage(recordFor(m, cur), audit.Renew),
		withStage(recordFor(m, provider.Lease{ID: "L-NEW"}), audit.Failure),
	} {
		rec.Time, rec.Outcome = at, audit.Success
		if err := log.Log(rec); err != nil {
			t.Fatal(err)
		}
	}
	// A task lease's issue, as IssueTask writes it.
	task := recordFor(m, provider.Lease{ID: "L-TASK1"})
	task.Task, task.Role = "job-1", "esc_task1"
	task = withExpiry(withStage(task, audit.Issue), m.Tasks["job-1"].ExpiresAt)
	task.Time, task.Outcome = at, audit.Success
	if err := log.Log(task); err != nil {
		t.Fatal(err)
	}

	if *update {
		if err := os.WriteFile(renderedGolden, out.Bytes(), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(renderedGolden)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(out.Bytes(), want) {
		t.Fatalf("rendered as\n%s\nwant (%s)\n%s", out.Bytes(), renderedGolden, want)
	}
}
