package lease

import (
	"encoding/json"
	"fmt"
	"slices"

	"github.com/ephemeral-secrets/csi-driver/pkg/lease/revocation"
	"github.com/ephemeral-secrets/csi-driver/pkg/lease/state"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/storage"
)

// MetadataReader reads volume records; all the lease manager's recovery
// and the inventory need.
type MetadataReader interface {
	ListVolumes() ([]string, error)
	ReadMetadata(volumeID string) (Metadata, error)
	// ReadLease returns the volume's current lease: the record of the
	// lease its metadata names.
	ReadLease(volumeID string) (provider.Lease, error)
	// ListLeases returns every lease record the volume holds: its current
	// lease and any that a rotation or an issue left on its way.
	ListLeases(volumeID string) ([]provider.Lease, error)
	ListRevocations() ([]revocation.Entry, error)
}

// MetadataWriter records volume metadata and the revocation queue.
type MetadataWriter interface {
	// WriteRecord and ReadRecord keep a small named record of the node's
	// own (not a volume's), such as which identities asked for what.
	WriteRecord(name string, v any) error
	ReadRecord(name string, v any) error
	WriteMetadata(m Metadata) error
	// WriteLease records l, keyed by its ID: the records of other leases
	// of the volume stay until DeleteLease.
	WriteLease(volumeID string, l provider.Lease) error
	DeleteLease(volumeID, leaseID string) error
	PutRevocation(r revocation.Entry) error
	DeleteRevocation(leaseID string) error
}

// Store is what the manager needs of the storage.
type Store interface {
	MetadataReader
	MetadataWriter
	storage.DataWriter
	RemoveOrphans() (int, error)
}

// RawStore is the volume store as pkg/storage gives it: records it keeps
// without reading them, and the volumes' files and mounts.
type RawStore interface {
	storage.RecordStore
	storage.DataWriter
	RemoveOrphans() (int, error)
}

// NewStore gives the manager its Store over a raw one (a
// *storage.Filesystem, or a test's wrapper of one): this package encodes
// and decodes its records, the raw store keeps them.
func NewStore(raw RawStore) Store {
	return &store{StateRecords: NewStateRecords(raw), DataWriter: raw, orphans: raw}
}

type store struct {
	StateRecords
	storage.DataWriter
	orphans interface{ RemoveOrphans() (int, error) }
}

func (s *store) RemoveOrphans() (int, error) { return s.orphans.RemoveOrphans() }

// StateRecords reads and writes the lease records (pkg/lease/state's
// codec) and the revocation queue's entries in a raw record store.
type StateRecords struct {
	state.Records
	raw storage.RecordStore
}

var (
	_ MetadataReader = StateRecords{}
	_ MetadataWriter = StateRecords{}
	_ Store          = (*store)(nil)
)

// NewStateRecords reads and writes the records of raw: what ReadInventory
// needs of a state directory opened with storage.OpenExisting.
func NewStateRecords(raw storage.RecordStore) StateRecords {
	return StateRecords{Records: state.NewRecords(raw), raw: raw}
}

// PutRevocation adds or updates an entry of the revocation queue.
func (r StateRecords) PutRevocation(e revocation.Entry) error {
	return r.raw.PutRevocation(e.Lease.ID, e)
}

// DeleteRevocation removes an entry; removing an absent one is fine.
func (r StateRecords) DeleteRevocation(leaseID string) error { return r.raw.DeleteRevocation(leaseID) }

// ListRevocations returns the queue, oldest first.
func (r StateRecords) ListRevocations() ([]revocation.Entry, error) {
	raw, err := r.raw.ListRevocations()
	if err != nil {
		return nil, err
	}
	var out []revocation.Entry
	for _, data := range raw {
		var e revocation.Entry
		if err := json.Unmarshal(data, &e); err != nil {
			return nil, fmt.Errorf("revocation record: %w", err)
		}
		out = append(out, e)
	}
	slices.SortStableFunc(out, func(a, b revocation.Entry) int { return a.EnqueuedAt.Compare(b.EnqueuedAt) })
	return out, nil
}
