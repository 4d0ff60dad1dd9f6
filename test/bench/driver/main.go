// Command driver is the benchmark's build of the node plugin: the real
// command with one more provider, "static", that returns fixed values at
// once, so the benchmark measures the driver and not a backend. It is
// never part of the shipped binary.
package main

import (
	"context"
	"net/http"
	_ "net/http/pprof"
	"os"
	"strings"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/cli"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// static issues three 256-byte values, renews by an hour, revokes nothing.
type static struct{}

var values = map[string]string{
	"username": strings.Repeat("u", 256),
	"password": strings.Repeat("p", 256),
	"token":    strings.Repeat("t", 256),
}

func (static) Issue(_ context.Context, req provider.Request) (provider.Lease, error) {
	now := time.Now()
	return provider.Lease{Values: values, Role: "static", IssuedAt: now, ExpiresAt: now.Add(time.Hour)}, nil
}

func (static) Renew(_ context.Context, l provider.Lease) (provider.Lease, error) {
	l.ExpiresAt = time.Now().Add(time.Hour)
	return l, nil
}

func (static) Revoke(context.Context, provider.Lease) error { return nil }

func main() {
	// ESC_BENCH_PPROF=127.0.0.1:6060 serves net/http/pprof, for profiling.
	if addr := os.Getenv("ESC_BENCH_PPROF"); addr != "" {
		go func() { _ = http.ListenAndServe(addr, nil) }()
	}
	os.Exit(cli.Main("bench", os.Args[1:], func(r *provider.Registry) error {
		return r.Register("static", static{})
	}))
}
