package revocation

import (
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/credential"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// Entry is one entry of the durable revocation queue, as the store keeps
// it (its JSON is the on-disk format: fields may be added, never renamed).
type Entry struct {
	Lease      provider.Lease `json:"lease"` // may hold a secret handle: tmpfs only
	VolumeID   string         `json:"volumeID"`
	Class      string         `json:"class"`
	Pod        provider.Pod   `json:"pod"`
	Reason     string         `json:"reason"`
	Task       string         `json:"task,omitempty"` // of a task lease
	EnqueuedAt time.Time      `json:"enqueuedAt"`
	// NotBefore delays the revocation (a rotated-out lease's grace).
	NotBefore time.Time `json:"notBefore,omitzero"`
	Attempts  int       `json:"attempts"`
	LastError string    `json:"lastError,omitempty"`
}

// Credential is the record of the credential e revokes: what the audit
// trail and the cluster's inventory say of it.
func (e Entry) Credential() credential.Record {
	return credential.Record{
		VolumeID: e.VolumeID, Pod: e.Pod, Class: e.Class, Provider: e.Lease.Provider, Role: e.Lease.Role,
		LeaseID: e.Lease.ID, Task: e.Task, IssuedAt: e.Lease.IssuedAt, ExpiresAt: e.Lease.ExpiresAt,
	}
}
