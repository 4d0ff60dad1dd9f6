package state

import (
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/storage"
)

// Records reads and writes a volume's records (its Metadata and its lease
// records) and the node's own small records in a raw record store, which
// keeps them as JSON it never reads.
type Records struct{ raw storage.RecordStore }

// NewRecords reads and writes the records of raw.
func NewRecords(raw storage.RecordStore) Records { return Records{raw: raw} }

// WriteRecord keeps a small named record of the node's own (not a
// volume's), such as which identities asked for what.
func (r Records) WriteRecord(name string, v any) error { return r.raw.WriteRecord(name, v) }

// ReadRecord reads a record WriteRecord wrote.
func (r Records) ReadRecord(name string, v any) error { return r.raw.ReadRecord(name, v) }

// WriteMetadata records m, replacing what was there atomically.
func (r Records) WriteMetadata(m Metadata) error { return r.raw.WriteMetadata(m.VolumeID, m) }

// ReadMetadata returns the volume's metadata or storage.ErrVolumeNotFound.
func (r Records) ReadMetadata(volumeID string) (Metadata, error) {
	var m Metadata
	err := r.raw.ReadMetadata(volumeID, &m)
	return m, err
}

// ListVolumes returns the IDs of every volume with metadata, sorted.
func (r Records) ListVolumes() ([]string, error) {
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

// WriteLease records a lease of the volume (secret: tmpfs, mode 0600),
// keyed by its ID: the records of other leases of the volume stay until
// DeleteLease.
func (r Records) WriteLease(volumeID string, l provider.Lease) error {
	return r.raw.WriteLease(volumeID, l.ID, l)
}

// ReadLease returns the lease the volume's metadata names, from its keyed
// record or, if a driver before keyed records wrote it, the legacy one;
// storage.ErrVolumeNotFound if there is none.
func (r Records) ReadLease(volumeID string) (provider.Lease, error) {
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

// ListLeases returns every lease record of the volume, sorted by ID: its
// current lease and any that a rotation or an issue left on its way.
func (r Records) ListLeases(volumeID string) ([]provider.Lease, error) {
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
func (r Records) DeleteLease(volumeID, leaseID string) error {
	if err := r.raw.DeleteLease(volumeID, leaseID); err != nil {
		return err
	}
	var l provider.Lease
	if r.raw.ReadLegacyLease(volumeID, &l) == nil && l.ID == leaseID {
		return r.raw.DeleteLegacyLease(volumeID)
	}
	return nil
}
