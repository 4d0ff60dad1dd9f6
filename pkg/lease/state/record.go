// Package state defines the lease state machine's own records: a
// volume's Metadata, the Task record of each task lease, the State each
// is in; the lease and task IDs that key them (NewLeaseID, ValidTask);
// the node's own record of who asked first (Seen); and their codec over
// the volume store (Records), which keeps them as JSON it never reads.
//
// Their JSON is the on-disk format of a live node's state: a driver
// upgraded over it must read it back, so a field may be added but never
// renamed or retyped (pkg/lease/testdata/state holds records an earlier
// driver wrote; pkg/lease's golden test reads them).
//
// It imports pkg/provider and pkg/storage; pkg/lease, pkg/lease/volume
// and, through pkg/lease's names, the edges import it.
package state

import (
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// State of a volume's lease, recorded before each step so that a crash
// at any point can be finished or undone.
type State string

const (
	// Issuing: the lease ID is chosen and Issue may have run; the lease may
	// exist in the backend without being recorded yet.
	Issuing State = "issuing"
	// Published: files are written and the lease is recorded.
	Published State = "published"
	// Withdrawn: the volume's credential was taken back while its pod runs
	// (the pod gave it back, or an admin killed it). The volume stays
	// mounted and empty until its unpublish; nothing is issued for it again,
	// and every lease it held is revoked, after a restart too.
	Withdrawn State = "withdrawn"
)

// Metadata is what the driver records about a volume: nothing secret. A
// Metadata value is replaced whole, never changed in place: its maps are
// shared by its copies.
type Metadata struct {
	VolumeID   string            `json:"volumeID"`
	TargetPath string            `json:"targetPath"`
	ReadOnly   bool              `json:"readOnly"`
	MountGroup string            `json:"mountGroup,omitempty"`
	Attributes map[string]string `json:"attributes"` // volume context less tokens: for idempotency checks
	Class      string            `json:"class"`
	Provider   string            `json:"provider"`
	Pod        provider.Pod      `json:"pod"`
	LeaseID    string            `json:"leaseID"`
	// PendingLeaseID is set before a provider is asked to issue and cleared
	// once the lease is recorded: after a crash it names what to revoke.
	PendingLeaseID string            `json:"pendingLeaseID,omitempty"`
	Params         map[string]string `json:"params,omitempty"` // provider parameters, to revoke an interrupted issue
	Role           string            `json:"role,omitempty"`
	State          State             `json:"state"`
	CreatedAt      time.Time         `json:"createdAt"`
	IssuedAt       time.Time         `json:"issuedAt,omitzero"`
	ExpiresAt      time.Time         `json:"expiresAt,omitzero"`
	RenewedAt      time.Time         `json:"renewedAt,omitzero"`
	// GrantTTL is the lifetime the lease got when it was issued: renewal
	// keeps the same margin before expiry when a max TTL shortens a grant.
	GrantTTL time.Duration `json:"grantTTL,omitempty"`
	// LapseRecorded is the expiry of the lease whose lapse was last
	// audited, so that each lapse is recorded once, across restarts too.
	LapseRecorded time.Time `json:"lapseRecorded,omitzero"`
	// WithdrawnAt and WithdrawReason say when and why the volume was
	// withdrawn (Withdrawn).
	WithdrawnAt    time.Time `json:"withdrawnAt,omitzero"`
	WithdrawReason string    `json:"withdrawReason,omitempty"`
	// WithdrawnLease is the lease the volume held when it was withdrawn.
	WithdrawnLease string `json:"withdrawnLease,omitempty"`
	// Renewals counts the renewals of the current lease.
	Renewals int `json:"renewals,omitempty"`
	// LeaseAPI: the volume has a lease socket (its class asked for one).
	LeaseAPI bool `json:"leaseAPI,omitempty"`
	// MaxTasks bounds the volume's live task leases.
	MaxTasks int `json:"maxTasks,omitempty"`
	// Tasks are the volume's task leases by task ID: recorded before each
	// is issued (Issuing), published once its files are written.
	Tasks map[string]Task `json:"tasks,omitempty"`
}

// Task is the record of one task lease of a volume: nothing secret.
type Task struct {
	LeaseID   string    `json:"leaseID"`
	State     State     `json:"state"`
	Role      string    `json:"role,omitempty"`
	IssuedAt  time.Time `json:"issuedAt,omitzero"`
	ExpiresAt time.Time `json:"expiresAt,omitzero"`
}
