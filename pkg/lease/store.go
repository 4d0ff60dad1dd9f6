package lease

import (
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/ephemeral-secrets/csi-driver/pkg/lease/revocation"
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
	return &store{StateRecords: StateRecords{raw: raw}, DataWriter: raw, orphans: raw}
}

type store struct {
	StateRecords
	storage.DataWriter
	orphans interface{ RemoveOrphans() (int, error) }
}

func (s *store) RemoveOrphans() (int, error) { return s.orphans.RemoveOrphans() }

// StateRecords reads and writes the lease records in a raw record store.
type StateRecords struct{ raw storage.RecordStore }

var (
	_ MetadataReader = StateRecords{}
	_ MetadataWriter = StateRecords{}
	_ Store          = (*store)(nil)
)

// NewStateRecords reads and writes the records of raw: what ReadInventory
// needs of a state directory opened with storage.OpenExisting.
func NewStateRecords(raw storage.RecordStore) StateRecords { return StateRecords{raw: raw} }

// WriteRecord implements MetadataWriter.
func (r StateRecords) WriteRecord(name string, v any) error { return r.raw.WriteRecord(name, v) }

// ReadRecord implements MetadataWriter.
func (r StateRecords) ReadRecord(name string, v any) error { return r.raw.ReadRecord(name, v) }

// WriteMetadata records m, replacing what was there atomically.
func (r StateRecords) WriteMetadata(m Metadata) error { return r.raw.WriteMetadata(m.VolumeID, m) }

// ReadMetadata returns the volume's metadata or storage.ErrVolumeNotFound.
func (r StateRecords) ReadMetadata(volumeID string) (Metadata, error) {
	var m Metadata
	err := r.raw.ReadMetadata(volumeID, &m)
	return m, err
}

// ListVolumes returns the IDs of every volume with metadata, sorted.
func (r StateRecords) ListVolumes() ([]string, error) {
	raw, err := r.raw.ListMetadata()
	if err != nil {
		return nil, err
	}
	var ids []string
	for _, data := range raw {
		var m Metadata
		if err := json.Unmarshal(data, &m); err != nil {
			continue // as a record that was never written
		}
		ids = append(ids, m.VolumeID)
	}
	slices.Sort(ids)
	return ids, nil
}

// WriteLease records a lease of the volume (secret: tmpfs, mode 0600).
func (r StateRecords) WriteLease(volumeID string, l provider.Lease) error {
	return r.raw.WriteLease(volumeID, l.ID, l)
}

// ReadLease returns the lease the volume's metadata names, from its keyed
// record or, if a driver before keyed records wrote it, the legacy one;
// storage.ErrVolumeNotFound if there is none.
func (r StateRecords) ReadLease(volumeID string) (provider.Lease, error) {
	m, err := r.ReadMetadata(volumeID)
	if err != nil {
		return provider.Lease{}, err
	}
	if m.LeaseID == "" {
		return provider.Lease{}, storage.ErrVolumeNotFound
	}
	var l provider.Lease
	err = r.raw.ReadLease(volumeID, m.LeaseID, &l)
	if errors.Is(err, storage.ErrVolumeNotFound) {
		if err = r.raw.ReadLegacyLease(volumeID, &l); err == nil && l.ID != m.LeaseID {
			err = storage.ErrVolumeNotFound
		}
	}
	return l, err
}

// ListLeases returns every lease record of the volume, sorted by ID.
func (r StateRecords) ListLeases(volumeID string) ([]provider.Lease, error) {
	raw, err := r.raw.ListLeases(volumeID)
	if err != nil {
		return nil, err
	}
	var out []provider.Lease
	for _, data := range raw {
		var l provider.Lease
		if err := json.Unmarshal(data, &l); err != nil {
			return nil, fmt.Errorf("lease record of volume %s: %w", volumeID, err)
		}
		out = append(out, l)
	}
	slices.SortFunc(out, func(a, b provider.Lease) int { return strings.Compare(a.ID, b.ID) })
	return out, nil
}

// DeleteLease removes the record of a lease, the legacy one too if it is
// that lease's; removing an absent one is fine.
func (r StateRecords) DeleteLease(volumeID, leaseID string) error {
	if err := r.raw.DeleteLease(volumeID, leaseID); err != nil {
		return err
	}
	var l provider.Lease
	if r.raw.ReadLegacyLease(volumeID, &l) == nil && l.ID == leaseID {
		return r.raw.DeleteLegacyLease(volumeID)
	}
	return nil
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
