// Package provider defines the contract between the lease manager and the
// backends that mint credentials, and a registry of the backends a driver
// was built with.
//
// It imports none of our packages: every provider, the lease manager and
// the issuer build on it.
package provider

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sort"
	"sync"
	"time"
)

// Sentinel errors a Provider returns (wrapped with %w) so that the lease
// manager and the gRPC edge can act on what happened without knowing the
// backend.
var (
	// ErrNotRenewable means the lease cannot be extended (it reached its
	// maximum TTL, or the backend has no renewal): the manager re-issues,
	// swaps the files and revokes the old lease instead.
	ErrNotRenewable = errors.New("lease cannot be renewed")
	// ErrNotRevocable means the backend cannot revoke this credential before
	// it expires (an STS session, say). The manager records that the
	// credential lives until its expiry and does not retry.
	ErrNotRevocable = errors.New("lease cannot be revoked before it expires")
	// ErrPermissionDenied means the pod's identity may not have what it asked for.
	ErrPermissionDenied = errors.New("permission denied")
	// ErrInvalidParameters means the class parameters are wrong; retrying
	// will not help.
	ErrInvalidParameters = errors.New("invalid parameters")
	// ErrNotFound means the object the class names does not exist in the backend.
	ErrNotFound = errors.New("not found")
	// ErrUnavailable means the backend could not be reached or refused for a
	// transient reason; the caller retries later.
	ErrUnavailable = errors.New("backend unavailable")
	// ErrMisconfigured means the backend refused what the admin's
	// configuration makes the driver do (a statement that fails, an admin
	// credential refused): neither the pod nor a retry can fix it, the
	// admin can.
	ErrMisconfigured = errors.New("backend configuration error")
)

// Pod is the identity of the pod a volume belongs to, as kubelet reports it.
type Pod struct {
	Namespace      string `json:"namespace"`
	Name           string `json:"name"`
	UID            string `json:"uid"`
	ServiceAccount string `json:"serviceAccount"`
}

// Token is a service-account token kubelet requested for the pod
// (CSIDriver.spec.tokenRequests). It is a secret.
type Token struct {
	Token     string    `json:"token"`
	ExpiresAt time.Time `json:"expirationTimestamp"`
}

// Request is what a Provider needs to mint one lease.
type Request struct {
	// LeaseID is chosen by the manager before Issue is called and is
	// recorded durably first, so that a crash during Issue can still be
	// cleaned up: Revoke must accept a Lease that carries only ID and Params.
	// It is unique, not secret, and made of [a-z0-9-].
	LeaseID string
	// VolumeID is the CSI volume the lease is for (not secret).
	VolumeID string
	// Class is "namespace/name" of the SecretProviderClass.
	Class string
	// Params are the class parameters meant for the provider.
	Params map[string]string
	Pod    Pod
	// Tokens are the pod's service-account tokens keyed by audience.
	Tokens map[string]Token
	// Prior is the lease this one replaces, set only when the manager
	// re-issues a volume's credential in place of a live one: a renewal
	// the provider answered ErrNotRenewable, a lapsed lease, a rotation
	// the pod asked for. It is nil at a publish (kubelet's republish asks
	// no provider anything) and for a task lease. A provider may carry
	// over from it what cannot have changed, such as the value of a pinned
	// secret version, instead of reading it again; it must never trust it
	// for anything the class or the admin's configuration decides, and
	// must not modify it. Its values are secret.
	Prior *Lease
	// Fresh is set when the pod asked for a new credential (the lease
	// socket's rotate): a provider carries over from Prior nothing that
	// grants access (an STS session), whenever it comes; only what cannot
	// have changed (a pinned version's value).
	Fresh bool
}

// Lease is one credential a backend issued.
type Lease struct {
	// ID is Request.LeaseID: not secret, safe for logs and audit.
	ID string `json:"id"`
	// Provider names the backend that issued the lease.
	Provider string `json:"provider"`
	// Params are the class parameters the lease was issued with.
	Params map[string]string `json:"params,omitempty"`
	// Handle is whatever the provider needs to renew and revoke the lease
	// after a driver restart. It may be secret (a Vault token): it is kept
	// in memory and in the node's tmpfs state only.
	Handle map[string]string `json:"handle,omitempty"`
	// Values are the credential's values (username, password, ...) that
	// render turns into files. Secret.
	Values map[string]string `json:"values,omitempty"`
	// Info holds non-secret details templates may use (host, port, database).
	Info map[string]string `json:"info,omitempty"`
	// Modes are the file modes the class asks the provider for, by value
	// name (a GCP class's per-secret mode): render gives them to the files
	// of those values that the class's own file layout sets no mode for.
	// Read bits only (within 0444): the volume is read-only and noexec.
	Modes map[string]os.FileMode `json:"modes,omitempty"`
	// Role is a non-secret description of what the lease grants (a role
	// name), for audit.
	Role      string    `json:"role,omitempty"`
	IssuedAt  time.Time `json:"issuedAt"`
	ExpiresAt time.Time `json:"expiresAt"`
	// RenewAt, when set, is when the provider wants the lease renewed (a
	// class's renewBefore); the manager renews at the earlier of it and
	// its own renewal point.
	RenewAt time.Time `json:"renewAt,omitzero"`
}

// Provider mints, renews and revokes credentials in one backend.
type Provider interface {
	// Issue mints a new credential for the request.
	Issue(ctx context.Context, req Request) (Lease, error)
	// Renew extends the lease and returns it with its new expiry, or
	// ErrNotRenewable when the manager must re-issue instead.
	Renew(ctx context.Context, l Lease) (Lease, error)
	// Revoke ends the credential. It is idempotent: revoking what is already
	// gone succeeds. It returns ErrNotRevocable where the backend cannot.
	Revoke(ctx context.Context, l Lease) error
}

// Registry maps provider names (SecretProviderClass spec.provider) to
// Providers. The zero value is empty and ready to use. It is safe for
// concurrent use: Replace swaps the whole set while Get is being called.
type Registry struct {
	mu        sync.RWMutex
	providers map[string]Provider
}

// Register adds p under name; registering a name twice is an error.
func (r *Registry) Register(name string, p Provider) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.providers == nil {
		r.providers = map[string]Provider{}
	}
	if _, ok := r.providers[name]; ok {
		return fmt.Errorf("provider %q registered twice", name)
	}
	r.providers[name] = p
	return nil
}

// Replace makes r hold exactly the providers of other, at once: a Get
// sees either the old set or the new one. other should not be used after.
func (r *Registry) Replace(other *Registry) {
	other.mu.RLock()
	next := make(map[string]Provider, len(other.providers))
	for n, p := range other.providers {
		next[n] = p
	}
	other.mu.RUnlock()
	r.mu.Lock()
	r.providers = next
	r.mu.Unlock()
}

// Get returns the provider registered under name.
func (r *Registry) Get(name string) (Provider, bool) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	p, ok := r.providers[name]
	return p, ok
}

// Names lists the registered providers, sorted.
func (r *Registry) Names() []string {
	r.mu.RLock()
	names := make([]string, 0, len(r.providers))
	for n := range r.providers {
		names = append(names, n)
	}
	r.mu.RUnlock()
	sort.Strings(names)
	return names
}
