// Package credential defines the record of one live credential, the one
// shape the node's inventory (pkg/lease), its records outbox
// (pkg/lease/outbox), the issuer (pkg/issuer) and the cluster's inventory
// (pkg/inventory) share, and that the audit trail (pkg/audit) renders
// from: who holds the credential, what it is, its state and its times.
// Nothing secret is in it.
//
// It imports pkg/provider (the pod, its plain type) and nothing else of
// ours, so that every layer above may name it.
package credential

import (
	"errors"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// Record is the non-secret record of one live credential. Its JSON is
// what `ephemeral-secrets-csi inventory` prints of a live lease (with the
// volume's target path beside it): field names, their order and what
// each omits when empty are part of that output.
type Record struct {
	// Who: the pod's volume, the pod and the node it runs on.
	VolumeID string       `json:"volumeID"`
	Pod      provider.Pod `json:"pod"`
	Node     string       `json:"node,omitempty"`
	// What: the class ("namespace/name"), the provider, the role the
	// class names ("connection/role" for postgres), the backend's own name
	// for the credential where it has one (the database role's name), the
	// lease's ID and, for a task lease, its task.
	Class    string `json:"class"`
	Provider string `json:"provider"`
	Role     string `json:"role,omitempty"`
	Name     string `json:"name,omitempty"`
	LeaseID  string `json:"leaseID"`
	Task     string `json:"task,omitempty"`
	// State is where the credential is in its life, as its holder names
	// it (the node's lease states); empty where the holder keeps none.
	State string `json:"state"`
	// When: issued, valid until, last renewed (zero: unknown or never).
	IssuedAt  time.Time `json:"issuedAt,omitzero"`
	ExpiresAt time.Time `json:"expiresAt,omitzero"`
	RenewedAt time.Time `json:"renewedAt,omitzero"`
}

// ErrRecordGone is what recording a credential returns (wrapped) when its
// record was deleted, or is being deleted (the kill switch, the pod's
// deletion, racing an issue or a renewal): the credential is being
// revoked and must not be extended or recorded again.
var ErrRecordGone = errors.New("the credential's record was deleted")

// Usage is what the issuer saw of a credential's use: the sessions its
// role opened in the backend (pkg/issuer/use samples them). Nothing in it
// is secret: addresses, times and counts.
type Usage struct {
	// FirstUsedAt is when a session of the credential was first seen;
	// zero: never used (so far).
	FirstUsedAt time.Time `json:"firstUsedAt,omitzero"`
	// LastUsedAt is when a session of it was last seen.
	LastUsedAt time.Time `json:"lastUsedAt,omitzero"`
	// Sources are the distinct client addresses its sessions came from,
	// in the order first seen, at most MaxSources (Dropped counts the
	// ones left out).
	Sources []Source `json:"sources,omitempty"`
	Dropped int      `json:"droppedSources,omitempty"`
	// Sessions is the most sessions of it seen open at once.
	Sessions int `json:"sessions,omitempty"`
	// Sampled is false when the issuer could not see sessions (its admin
	// lacks the privilege, or sampling failed): "never used" then means
	// "not known".
	Sampled bool `json:"sampled"`
}

// Source is one client address a credential was used from.
type Source struct {
	// Address is the client's IP address (no port).
	Address string `json:"address"`
	// FirstSeen is when a session from it was first seen.
	FirstSeen time.Time `json:"firstSeen"`
	// Foreign is true when the address is none the admin expects for the
	// credential (its pod's IPs, its node's addresses, the connection's
	// listed networks).
	Foreign bool `json:"foreign,omitempty"`
}

// MaxSources bounds Usage.Sources.
const MaxSources = 8
