package record

import (
	"errors"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// Entry is the non-secret record of one credential.
type Entry struct {
	LeaseID  string       `json:"leaseID"`
	VolumeID string       `json:"volumeID"`
	Pod      provider.Pod `json:"pod"`
	Node     string       `json:"node,omitempty"`
	Class    string       `json:"class"`
	Provider string       `json:"provider"`
	// Role is "connection/role"; Name the database role's name.
	Role      string    `json:"role"`
	Name      string    `json:"name"`
	IssuedAt  time.Time `json:"issuedAt,omitzero"`
	ExpiresAt time.Time `json:"expiresAt,omitzero"`
}

// ErrRecordGone is what a recorder's Issued wraps when the credential's
// record was deleted, or is being deleted.
var ErrRecordGone = errors.New("credential record deleted")
