package lease

import (
	"maps"
	"slices"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// Live is a lease alive on the node, as an admin sees it: nothing secret.
type Live struct {
	VolumeID  string       `json:"volumeID"`
	Pod       provider.Pod `json:"pod"`
	Class     string       `json:"class"`
	Provider  string       `json:"provider"`
	Role      string       `json:"role,omitempty"`
	LeaseID   string       `json:"leaseID"`
	Task      string       `json:"task,omitempty"` // a task lease of the volume's
	State     string       `json:"state"`
	IssuedAt  time.Time    `json:"issuedAt,omitzero"`
	ExpiresAt time.Time    `json:"expiresAt,omitzero"`
	RenewedAt time.Time    `json:"renewedAt,omitzero"`
	Target    string       `json:"targetPath"`
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
		lid := m.LeaseID
		if lid == "" {
			lid = m.PendingLeaseID
		}
		inv.Live = append(inv.Live, Live{
			VolumeID: m.VolumeID, Pod: m.Pod, Class: m.Class, Provider: m.Provider, Role: m.Role,
			LeaseID: lid, State: string(m.State), IssuedAt: m.IssuedAt, ExpiresAt: m.ExpiresAt,
			RenewedAt: m.RenewedAt, Target: m.TargetPath,
		})
		for _, task := range slices.Sorted(maps.Keys(m.Tasks)) {
			t := m.Tasks[task]
			inv.Live = append(inv.Live, Live{
				VolumeID: m.VolumeID, Pod: m.Pod, Class: m.Class, Provider: m.Provider, Role: t.Role,
				LeaseID: t.LeaseID, Task: task, State: "task " + task + " (" + string(t.State) + ")",
				IssuedAt: t.IssuedAt, ExpiresAt: t.ExpiresAt, Target: m.TargetPath,
			})
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
