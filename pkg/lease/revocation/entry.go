package revocation

import (
	"time"

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
