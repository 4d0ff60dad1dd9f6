package issuer

import (
	"context"
	"strings"
	"time"

	utilclock "k8s.io/utils/clock"

	"github.com/ephemeral-secrets/csi-driver/pkg/credential"
	"github.com/ephemeral-secrets/csi-driver/pkg/issuer/use"
)

// UseOptions configure the issuer's observation of its credentials' use
// (pkg/issuer/use): Run samples, every Interval, the sessions of the
// roles it tagged, and acts on a foreign use as each role's onForeignUse
// says. With an Inventory that is a UseRecorder, what it sees goes to the
// credentials' records too.
type UseOptions struct {
	// Interval is how often Run samples (at least use.MinInterval); 0:
	// use is not observed.
	Interval time.Duration
	// Resolver tells a credential's pod's and node's addresses
	// (use.KubeResolver); nil: only the connections' expectedSources are
	// expected.
	Resolver use.Resolver
	// WithdrawFiles, when set, withdraws the files of a credential killed
	// for its foreign use (in-process: the node's lease manager); in a
	// cluster the Inventory's Withdraw does.
	WithdrawFiles func(ctx context.Context, e credential.Record, reason string) error
	// Meter counts what is seen (*metrics.Use).
	Meter use.Meter
	// Clock is the sampler's time (default the real clock).
	Clock utilclock.WithTicker
}

// newTracker returns the use tracker o asks for, or nil.
func (i *Issuer) newTracker(o UseOptions) *use.Tracker {
	if o.Interval <= 0 {
		return nil
	}
	var rec use.Recorder
	if r, ok := i.opts.Inventory.(UseRecorder); ok {
		rec = r
	}
	return use.New(use.Options{
		Engine: i.admin, Interval: o.Interval, Recorder: rec, Resolver: o.Resolver, Drop: i.dropKilled,
		WithdrawFiles: o.WithdrawFiles, Audit: i.opts.Audit, Meter: o.Meter, Clock: o.Clock,
	})
}

// dropKilled drops the role of e, killed for a foreign use: its record
// was withdrawn (the inventory's controller then removes it through Drop,
// which finds the role gone) or, in-process, its volume's files.
func (i *Issuer) dropKilled(ctx context.Context, e credential.Record) error {
	if i.records != nil {
		i.records.forget(e.LeaseID)
	}
	conn, _, _ := strings.Cut(e.Role, "/")
	_, err := i.admin.Drop(ctx, conn, e.Name, e.LeaseID, nil)
	return err
}

// Usage is what the issuer saw of the use of the live credential of
// leaseID (false: not observed, or not live).
func (i *Issuer) Usage(leaseID string) (credential.Usage, bool) {
	if i.use == nil {
		return credential.Usage{}, false
	}
	return i.use.Usage(leaseID)
}
