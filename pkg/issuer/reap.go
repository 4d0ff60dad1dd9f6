package issuer

import (
	"context"
	"errors"
	"fmt"
	"time"

	"k8s.io/klog/v2"

	"github.com/ephemeral-secrets/csi-driver/pkg/audit"
	pgengine "github.com/ephemeral-secrets/csi-driver/pkg/issuer/postgres"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider/postgres"
)

// ReapReport counts what one pass of the reaper saw and did.
type ReapReport struct {
	// Connections is how many connections were listed.
	Connections int `json:"connections"`
	// Tagged is how many roles carried the driver's tag.
	Tagged int `json:"tagged"`
	// Expired counts roles dropped because their VALID UNTIL (or their
	// maxTTL) passed.
	Expired int `json:"expired"`
	// Untracked counts roles dropped because no inventory record held
	// them past the grace.
	Untracked int `json:"untracked"`
	// Failed counts drops that failed (the next pass tries again).
	Failed int `json:"failed"`
	// Unlisted counts connections whose roles could not be listed.
	Unlisted int `json:"unlisted"`
}

// Dropped is how many roles the pass dropped.
func (r ReapReport) Dropped() int { return r.Expired + r.Untracked }

// Reap makes one pass: per connection, it lists the roles the driver
// tagged and drops (ends their sessions, drops what they own, drops them)
// those whose VALID UNTIL passed and, with an Inventory, those no record
// holds that are older than UntrackedGrace. Roles without the tag are
// never looked at. An error says what could not be listed or dropped;
// the report counts what was done meanwhile.
func (i *Issuer) Reap(ctx context.Context) (ReapReport, error) {
	var rep ReapReport
	var errs []error
	var tracked map[string]bool
	if inv := i.opts.Inventory; inv != nil {
		// Read before the roles are listed: a role made after this read is
		// younger than the grace.
		var err error
		if tracked, err = inv.Tracked(ctx); err != nil {
			tracked = nil // reap only what expired this pass
			errs = append(errs, fmt.Errorf("reading the inventory: %w", err))
		}
	}
	for _, conn := range i.admin.Connections() {
		lctx, cancel := context.WithTimeout(ctx, reapCallTimeout)
		roles, err := i.admin.Tagged(lctx, conn)
		cancel()
		if err != nil {
			rep.Unlisted++
			errs = append(errs, fmt.Errorf("connection %q: %w", conn, err))
			continue
		}
		rep.Connections++
		rep.Tagged += len(roles)
		now := i.opts.Now()
		for _, r := range roles {
			var why string
			notAfter := i.notAfter(conn, r)
			switch {
			case expired(r, notAfter, now):
				why = "expired"
			case tracked != nil && !tracked[r.Tag.LeaseID] && now.Sub(r.Tag.Created) >= i.opts.UntrackedGrace:
				why = "untracked"
			default:
				continue
			}
			dropped, err := i.reapOne(ctx, conn, r, notAfter, why, now)
			if err != nil {
				rep.Failed++
				errs = append(errs, err)
				continue
			}
			if !dropped {
				continue // extended since it was listed
			}
			if why == "expired" {
				rep.Expired++
			} else {
				rep.Untracked++
			}
		}
	}
	return rep, errors.Join(errs...)
}

func (i *Issuer) reapOne(ctx context.Context, conn string, r pgengine.TaggedRole, notAfter time.Time, why string, now time.Time) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, reapCallTimeout)
	defer cancel()
	var still func(pgengine.TaggedRole) bool
	if why == "expired" {
		// Decided on the listing: dropped only if still expired under
		// the role's lock (an Extend since moved it).
		still = func(cur pgengine.TaggedRole) bool { return expired(cur, notAfter, now) }
	}
	dropped, err := i.admin.Drop(ctx, conn, r.Name, r.Tag.LeaseID, still)
	if err == nil && !dropped {
		return false, nil
	}
	if err == nil && i.opts.Inventory != nil {
		i.records.forget(r.Tag.LeaseID)
		err = i.opts.Inventory.Dropped(ctx, r.Tag.LeaseID)
	}
	rec := audit.Record{
		Stage: audit.Expire, Pod: r.Tag.Pod, Class: r.Tag.Class, Provider: postgres.Name, Role: r.Tag.Role,
		LeaseID: r.Tag.LeaseID, Outcome: audit.Success, Detail: "reaped by the issuer: " + why,
		Lifetime: i.opts.Now().Sub(r.Tag.Created).Round(time.Second).String(),
	}
	if !r.ValidUntil.IsZero() {
		rec.ExpiresAt = &r.ValidUntil
	}
	if err != nil {
		rec.Outcome, rec.Error = audit.Error, err.Error()
		err = fmt.Errorf("reaping role %s (%s): %w", r.Name, why, err)
	}
	if aerr := i.opts.Audit.Log(rec); aerr != nil {
		klog.ErrorS(aerr, "Writing the audit log")
	}
	return err == nil, err
}

// Run reaps every ReapInterval, the first time at once, until ctx is done;
// with Options.Use, it observes the credentials' use meanwhile (the
// leader's work, as reaping is).
func (i *Issuer) Run(ctx context.Context) {
	if i.use != nil {
		done := make(chan struct{})
		go func() { defer close(done); i.use.Run(ctx) }()
		defer func() { <-done }()
	}
	t := time.NewTicker(i.opts.ReapInterval)
	defer t.Stop()
	for {
		rep, err := i.Reap(ctx)
		if ctx.Err() != nil {
			return
		}
		if i.opts.OnReap != nil {
			i.opts.OnReap(rep, err)
		}
		if err != nil {
			klog.ErrorS(err, "Reaping postgres roles", "dropped", rep.Dropped(), "failed", rep.Failed)
		} else if rep.Dropped() > 0 {
			klog.InfoS("Reaped postgres roles", "expired", rep.Expired, "untracked", rep.Untracked, "tagged", rep.Tagged)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
