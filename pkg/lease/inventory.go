package lease

import (
	"maps"
	"slices"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/credential"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// Live is a lease alive on the node, as an admin sees it (nothing
// secret): its record, and where the volume is mounted. Its JSON is the
// record's fields, then targetPath.
type Live struct {
	credential.Record
	Target string `json:"targetPath"`
}

// volumeCredential is the record of the volume's own lease, as its
// metadata has it (no lease ID while none was issued).
func volumeCredential(meta Metadata) credential.Record {
	return credential.Record{
		VolumeID: meta.VolumeID, Pod: meta.Pod, Class: meta.Class, Provider: meta.Provider, Role: meta.Role,
		LeaseID: meta.LeaseID, State: string(meta.State), IssuedAt: meta.IssuedAt, ExpiresAt: meta.ExpiresAt,
		RenewedAt: meta.RenewedAt,
	}
}

// taskCredential is the record of the lease of the volume's task id.
func taskCredential(meta Metadata, id string, t Task) credential.Record {
	return credential.Record{
		VolumeID: meta.VolumeID, Pod: meta.Pod, Class: meta.Class, Provider: meta.Provider, Role: t.Role,
		LeaseID: t.LeaseID, Task: id, State: string(t.State), IssuedAt: t.IssuedAt, ExpiresAt: t.ExpiresAt,
	}
}

// Pending is a revocation not yet confirmed by its backend.
type Pending struct {
	LeaseID    string       `json:"leaseID"`
	VolumeID   string       `json:"volumeID"`
	Pod        provider.Pod `json:"pod"`
	Class      string       `json:"class"`
	Provider   string       `json:"provider"`
	Role       string       `json:"role,omitempty"`
	Reason     string       `json:"reason"`
	Task       string       `json:"task,omitempty"`
	EnqueuedAt time.Time    `json:"enqueuedAt"`
	ExpiresAt  time.Time    `json:"expiresAt,omitzero"`
	Attempts   int          `json:"attempts"`
	LastError  string       `json:"lastError,omitempty"`
}

// Inventory is what credentials are alive on the node right now.
type Inventory struct {
	Live    []Live    `json:"live"`
	Pending []Pending `json:"pendingRevocations"`
}

// ReadInventory reads the inventory from a store; it works while the
// driver runs, or after it stopped, from its state directory.
func ReadInventory(s MetadataReader) (Inventory, error) {
	inv := Inventory{Live: []Live{}, Pending: []Pending{}}
	ids, err := s.ListVolumes()
	if err != nil {
		return inv, err
	}
	for _, id := range ids {
		m, err := s.ReadMetadata(id)
		if err != nil {
			continue // removed meanwhile
		}
		rec := volumeCredential(m)
		if rec.LeaseID == "" {
			rec.LeaseID = m.PendingLeaseID
		}
		inv.Live = append(inv.Live, Live{Record: rec, Target: m.TargetPath})
		for _, task := range slices.Sorted(maps.Keys(m.Tasks)) {
			rec := taskCredential(m, task, m.Tasks[task])
			rec.State = "task " + task + " (" + rec.State + ")"
			inv.Live = append(inv.Live, Live{Record: rec, Target: m.TargetPath})
		}
	}
	q, err := s.ListRevocations()
	if err != nil {
		return inv, err
	}
	for _, r := range q {
		inv.Pending = append(inv.Pending, Pending{
			LeaseID: r.Lease.ID, VolumeID: r.VolumeID, Pod: r.Pod, Class: r.Class, Provider: r.Lease.Provider,
			Role: r.Lease.Role, Reason: r.Reason, Task: r.Task, EnqueuedAt: r.EnqueuedAt, ExpiresAt: r.Lease.ExpiresAt,
			Attempts: r.Attempts, LastError: r.LastError,
		})
	}
	return inv, nil
}
