// Package fakeprovider is a backend in memory for the lease manager's
// unprivileged tests, where no PostgreSQL, Vault or STS can run: a
// provider.Provider over a ledger of every credential it issued, renewed
// and revoked, on the test's clock, so that a test can ask which
// credentials are alive, whether a pod's files log in, and that nothing
// is left behind. It behaves as the PostgreSQL provider does where the
// manager can tell (pkg/lease's TestBackendContract holds both to it): a
// lease ID names one credential (an issue repeated while it exists is
// refused as unavailable, and leaves it as it was), a renewal moves the
// expiry up to the lease's maximum TTL and answers ErrNotRenewable when it
// cannot, and a revocation is idempotent and needs only the lease's ID.
// Faults are injected by wrapping it in test/faults.Provider.
//
// It imports pkg/provider only.
package fakeprovider

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"time"

	"k8s.io/utils/clock"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// Credential is the ledger's entry of one lease.
type Credential struct {
	LeaseID   string
	Name      string // the username its files hold
	Password  string
	IssuedAt  time.Time
	ExpiresAt time.Time
	NotAfter  time.Time // the maximum TTL's end
	Issues    int       // issue calls that named it (more than one: a repeated issue, refused)
	Renewals  int
	Revoked   bool
}

// Provider is the backend and its provider at once.
type Provider struct {
	clock       clock.PassiveClock
	ttl, maxTTL time.Duration

	mu    sync.Mutex
	creds map[string]*Credential // by lease ID
	calls map[string]int         // "Issue", "Renew", "Revoke" -> calls answered
}

var _ provider.Provider = (*Provider)(nil)

// New returns a backend whose leases last ttl, renewable up to maxTTL
// from their issue, on clk.
func New(clk clock.PassiveClock, ttl, maxTTL time.Duration) *Provider {
	return &Provider{clock: clk, ttl: ttl, maxTTL: maxTTL, creds: map[string]*Credential{}, calls: map[string]int{}}
}

// Name is the username of the credential of a lease ID.
func Name(leaseID string) string { return "fake_" + leaseID }

// now is the backend's time, to the second (as PostgreSQL's VALID UNTIL
// is kept in the issuer's ledger).
func (p *Provider) now() time.Time { return p.clock.Now().UTC().Truncate(time.Second) }

func earlier(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

// answer starts the answer to a call of kind: it counts the call and
// locks the ledger (unlock when done), or fails as a call that ran out
// of time does.
func (p *Provider) answer(ctx context.Context, kind string) (unlock func(), err error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("%w: %w", provider.ErrUnavailable, err)
	}
	p.mu.Lock()
	p.calls[kind]++
	return p.mu.Unlock, nil
}

// Issue implements provider.Provider.
func (p *Provider) Issue(ctx context.Context, req provider.Request) (provider.Lease, error) {
	if req.LeaseID == "" {
		return provider.Lease{}, fmt.Errorf("%w: no lease ID", provider.ErrInvalidParameters)
	}
	var b [12]byte
	_, _ = rand.Read(b[:])
	now := p.now()
	unlock, err := p.answer(ctx, "Issue")
	if err != nil {
		return provider.Lease{}, err
	}
	defer unlock()
	if c := p.creds[req.LeaseID]; c != nil && !c.Revoked {
		c.Issues++
		return provider.Lease{}, fmt.Errorf("%w: credential %s already exists", provider.ErrUnavailable, c.Name)
	}
	c := &Credential{LeaseID: req.LeaseID, Name: Name(req.LeaseID), Password: hex.EncodeToString(b[:]),
		IssuedAt: now, NotAfter: now.Add(p.maxTTL), Issues: 1}
	c.ExpiresAt = earlier(now.Add(p.ttl), c.NotAfter)
	p.creds[req.LeaseID] = c
	return provider.Lease{
		Values:    map[string]string{"username": c.Name, "password": c.Password},
		Handle:    map[string]string{"name": c.Name},
		Role:      c.Name,
		IssuedAt:  c.IssuedAt,
		ExpiresAt: c.ExpiresAt,
	}, nil
}

// Renew implements provider.Provider: the expiry moves to a TTL from now,
// never past the maximum; ErrNotRenewable when it would not move, or the
// credential is gone.
func (p *Provider) Renew(ctx context.Context, l provider.Lease) (provider.Lease, error) {
	now := p.now()
	unlock, err := p.answer(ctx, "Renew")
	if err != nil {
		return l, err
	}
	defer unlock()
	c := p.creds[l.ID]
	if c == nil || c.Revoked {
		return l, fmt.Errorf("%w: credential %s is gone", provider.ErrNotRenewable, l.ID)
	}
	next := earlier(now.Add(p.ttl), c.NotAfter)
	if !next.After(l.ExpiresAt) {
		return l, fmt.Errorf("%w: the extension did not move the expiry", provider.ErrNotRenewable)
	}
	c.ExpiresAt = next
	c.Renewals++
	l.ExpiresAt = next
	return l, nil
}

// Revoke implements provider.Provider; revoking what is gone, or was never
// issued, succeeds.
func (p *Provider) Revoke(ctx context.Context, l provider.Lease) error {
	unlock, err := p.answer(ctx, "Revoke")
	if err != nil {
		return err
	}
	defer unlock()
	if c := p.creds[l.ID]; c != nil {
		c.Revoked = true
	}
	return nil
}

// Alive returns the names of the credentials issued and not revoked
// (expired or not: as a PostgreSQL role past its VALID UNTIL still
// exists until it is dropped).
func (p *Provider) Alive() map[string]bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := map[string]bool{}
	for _, c := range p.creds {
		if !c.Revoked {
			out[c.Name] = true
		}
	}
	return out
}

// Ledger returns a copy of every entry, by lease ID.
func (p *Provider) Ledger() map[string]Credential {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make(map[string]Credential, len(p.creds))
	for id, c := range p.creds {
		out[id] = *c
	}
	return out
}

// Calls is how many calls of kind ("Issue", "Renew", "Revoke") the
// backend answered.
func (p *Provider) Calls(kind string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.calls[kind]
}

// Errors of Login.
var (
	ErrNoSuchUser  = errors.New("no such credential")
	ErrBadPassword = errors.New("password authentication failed")
	ErrExpired     = errors.New("credential expired")
)

// Login reports whether name and password log in now, as a pod using its
// files would.
func (p *Provider) Login(name, password string) error {
	now := p.clock.Now()
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, id := range slices.Sorted(maps.Keys(p.creds)) {
		c := p.creds[id]
		if c.Name != name || c.Revoked {
			continue
		}
		switch {
		case c.Password != password:
			return fmt.Errorf("%s: %w", name, ErrBadPassword)
		case !now.Before(c.ExpiresAt):
			return fmt.Errorf("%s: %w", name, ErrExpired)
		}
		return nil
	}
	return fmt.Errorf("%s: %w", name, ErrNoSuchUser)
}
