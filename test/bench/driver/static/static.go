// Package static is the benchmark's provider, "static": it returns fixed
// values at once, so the benchmark measures the driver and not a
// backend. It is never part of a shipped binary.
package static

import (
	"context"
	"strings"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// Provider issues three 256-byte values, renews by an hour, revokes
// nothing.
type Provider struct{}

var values = map[string]string{
	"username": strings.Repeat("u", 256),
	"password": strings.Repeat("p", 256),
	"token":    strings.Repeat("t", 256),
}

// Issue returns the values, valid for an hour.
func (Provider) Issue(_ context.Context, req provider.Request) (provider.Lease, error) {
	now := time.Now()
	return provider.Lease{Values: values, Role: "static", IssuedAt: now, ExpiresAt: now.Add(time.Hour)}, nil
}

// Renew extends the lease by an hour.
func (Provider) Renew(_ context.Context, l provider.Lease) (provider.Lease, error) {
	l.ExpiresAt = time.Now().Add(time.Hour)
	return l, nil
}

// Revoke does nothing.
func (Provider) Revoke(context.Context, provider.Lease) error { return nil }

// Register adds the provider as "static" (a cli.Register).
func Register(r *provider.Registry) error { return r.Register("static", Provider{}) }
