// Package audit writes one JSON record per lifecycle stage of a credential:
// request, issue, use, renew, rotate, revoke, expire, failure; and one per load
// of the backend configuration (config). Records carry
// who, what, when and how long; never a secret.
//
// It imports pkg/provider (the pod it records) and pkg/credential (the
// record of a credential, which Of renders) only.
package audit

import (
	"encoding/json"
	"io"
	"sync"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/credential"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// Stage of a credential's life.
type Stage string

// The stages a record can describe.
const (
	Request Stage = "request"
	Issue   Stage = "issue"
	Renew   Stage = "renew"
	Rotate  Stage = "rotate"
	Revoke  Stage = "revoke"
	Expire  Stage = "expire"
	Failure Stage = "failure"
	// Config is a (re)load of the admin's backend configuration; its
	// Detail names the generation, never the file's content.
	Config Stage = "config"
	// API is a call of a volume's lease socket; Detail names the endpoint
	// and the answer's HTTP status.
	API Stage = "api"
	// Use is what the issuer saw of a credential's use (its sessions in
	// the backend): the first use, a new source address, a foreign use,
	// no use within the role's unusedAfter, and at revocation a summary.
	// Detail says which; never the credential.
	Use Stage = "use"
)

// Outcomes.
const (
	Success = "success"
	Error   = "error"
	// Pending: the step was accepted and will finish later (a queued revocation).
	Pending = "pending"
	// Unrevocable: the backend cannot revoke; the credential lives until ExpiresAt.
	Unrevocable = "unrevocable"
	// Refused: a lease socket call refused (a limit, a bad request).
	Refused = "refused"
)

// Record is one audit line.
type Record struct {
	Time     time.Time    `json:"time"`
	Stage    Stage        `json:"stage"`
	VolumeID string       `json:"volume_id"`
	Pod      provider.Pod `json:"pod"`
	Class    string       `json:"class,omitempty"`
	Provider string       `json:"provider,omitempty"`
	Role     string       `json:"role,omitempty"`
	LeaseID  string       `json:"lease_id,omitempty"`
	// Task is the task a task lease was issued for (the lease socket).
	Task      string     `json:"task,omitempty"`
	ExpiresAt *time.Time `json:"expires_at,omitempty"`
	Outcome   string     `json:"outcome"`
	Error     string     `json:"error,omitempty"`
	Detail    string     `json:"detail,omitempty"`
	// Lifetime is how long the credential lived, on revoke and expire.
	Lifetime string `json:"lifetime,omitempty"`
	// FirstSeen marks the first request on this node from the pod's
	// namespace and service account for this class.
	FirstSeen bool `json:"first_seen,omitempty"`
	// Use is what a record of stage use says; nil on every other stage.
	Use *UseDetail `json:"use,omitempty"`
}

// UseDetail is what the issuer saw of a credential's use (stage use). Nothing
// in it is secret: addresses, times, counts and the action taken.
type UseDetail struct {
	// Event is which use: first (its first use), source (a session from
	// an address not seen before), foreign (a use from an address none
	// expected, and the action the role says), kill (what onForeignUse
	// revoke did: sessions ended, record or files withdrawn, role
	// dropped; its outcome error when some step failed, tried again),
	// unused (the role's unusedAfter passed without a use) or summary (at
	// its revocation).
	Event string `json:"event"`
	// Source is the client address of the session (first, source,
	// foreign); "local" for a Unix socket.
	Source string `json:"source,omitempty"`
	// Foreign is true when Source is none the admin expects.
	Foreign bool `json:"foreign,omitempty"`
	// Action is the role's onForeignUse (foreign): alert, revoke or
	// record.
	Action string `json:"action,omitempty"`
	// Usage is the credential's use as seen so far (summary: its whole
	// life).
	Usage *credential.Usage `json:"usage,omitempty"`
}

// The events of stage use.
const (
	UseFirst   = "first"
	UseSource  = "source"
	UseForeign = "foreign"
	UseKill    = "kill"
	UseUnused  = "unused"
	UseSummary = "summary"
)

// Of is the audit record of c, without its stage and outcome: who holds
// it, what it is and until when (in UTC).
func Of(c credential.Record) Record {
	r := Record{
		VolumeID: c.VolumeID, Pod: c.Pod, Class: c.Class, Provider: c.Provider, Role: c.Role,
		LeaseID: c.LeaseID, Task: c.Task,
	}
	if !c.ExpiresAt.IsZero() {
		t := c.ExpiresAt.UTC()
		r.ExpiresAt = &t
	}
	return r
}

// Logger writes records as JSON lines. The zero value discards them.
type Logger struct {
	mu  sync.Mutex
	enc *json.Encoder
	now func() time.Time
}

// New returns a Logger writing to w.
func New(w io.Writer) *Logger {
	return &Logger{enc: json.NewEncoder(w), now: time.Now}
}

// Log writes r, stamping its time if unset. Errors writing the audit trail
// are returned so the caller can log them.
func (l *Logger) Log(r Record) error {
	if l == nil || l.enc == nil {
		return nil
	}
	if r.Time.IsZero() {
		r.Time = l.now().UTC()
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.enc.Encode(r)
}
