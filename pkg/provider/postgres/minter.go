package postgres

import (
	"context"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// Minter is the authority over the roles of the postgres provider: the
// issuer (pkg/issuer), which holds the database's admin credential,
// decides whether a pod may have a role, and creates, extends and drops
// roles. The node plugin holds only the pod's password and sends its
// SCRAM-SHA-256 verifier.
//
// Without a cluster the Minter is an issuer in the driver's own process
// (issuer.Issuer.Local); in a cluster it is a client of the issuer
// Deployment (pkg/issuer/remote). One issuer, two transports.
type Minter interface {
	Mint(ctx context.Context, r MintRequest) (Grant, error)
	Extend(ctx context.Context, r ExtendRequest) (Grant, error)
	Drop(ctx context.Context, r DropRequest) error
}

// MintRequest asks for a new role for one pod volume.
type MintRequest struct {
	// LeaseID is the lease the role is for ([a-z0-9-], not secret); the
	// role's name derives from it (RoleName), so a request repeated after a
	// lost answer names the same role.
	LeaseID string `json:"leaseID"`
	// VolumeID is the CSI volume the lease belongs to.
	VolumeID string `json:"volumeID"`
	// Class is "namespace/name" of the SecretProviderClass.
	Class string `json:"class"`
	// Params are the class's provider parameters (connection, role, ttl).
	Params map[string]string `json:"params"`
	Pod    provider.Pod      `json:"pod"`
	// Verifier is the SCRAM-SHA-256 verifier of the password the node
	// made; the password itself never leaves the node. Never logged.
	Verifier string `json:"verifier"`
}

// ExtendRequest asks to move a role's VALID UNTIL forward: the proof of
// life of a pod volume.
type ExtendRequest struct {
	LeaseID  string            `json:"leaseID"`
	VolumeID string            `json:"volumeID"`
	Params   map[string]string `json:"params"`
	Pod      provider.Pod      `json:"pod"`
	// Name is the role's name as granted.
	Name string `json:"name"`
	// ExpiresAt is the lease's current expiry.
	ExpiresAt time.Time `json:"expiresAt"`
}

// DropRequest asks to end a role: its sessions ended, what it owns and
// the role dropped. Dropping a role that does not exist succeeds.
type DropRequest struct {
	LeaseID string            `json:"leaseID"`
	Params  map[string]string `json:"params"`
	// Name is the role's name; empty when an issue was interrupted before
	// its answer was recorded (RoleName(LeaseID) then).
	Name string `json:"name,omitempty"`
}

// Grant is what the Minter made: nothing secret.
type Grant struct {
	// Name is the PostgreSQL role's name.
	Name string `json:"name"`
	// Role is "connection/role" of the admin's configuration.
	Role string `json:"role"`
	// Host, Port and Database are what the pod dials.
	Host     string    `json:"host"`
	Port     string    `json:"port"`
	Database string    `json:"database"`
	IssuedAt time.Time `json:"issuedAt"`
	// ExpiresAt is the role's VALID UNTIL.
	ExpiresAt time.Time `json:"expiresAt"`
	// NotAfter is the latest expiry renewals can reach (issue + maxTTL).
	NotAfter time.Time `json:"notAfter"`
}
