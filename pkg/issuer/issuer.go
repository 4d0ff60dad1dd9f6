package issuer

import (
	"context"
	"errors"
	"fmt"
	"time"

	"k8s.io/klog/v2"

	"github.com/ephemeral-secrets/csi-driver/pkg/audit"
	"github.com/ephemeral-secrets/csi-driver/pkg/credential"
	pgengine "github.com/ephemeral-secrets/csi-driver/pkg/issuer/postgres"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider/postgres"
)

// Options configure an Issuer. Config is required; the zero value of
// every other field is useful.
type Options struct {
	// Config is the admin's postgres configuration (admin credentials).
	Config pgengine.Config
	// PodCheck, when set, is asked on every Mint and Extend.
	PodCheck PodCheck
	// Inventory, when set, records every credential; the reaper then
	// also drops tagged roles that no record holds.
	Inventory Inventory
	// ReapInterval is how often Run reaps (default 30s): a held-open
	// session outlives its role's VALID UNTIL by at most about that.
	ReapInterval time.Duration
	// UntrackedGrace is how old a tagged role without an inventory
	// record must be before it is reaped (default 1m), so a record on
	// its way is not raced.
	UntrackedGrace time.Duration
	// Now is the clock (default time.Now).
	Now func() time.Time
	// Audit, when set, gets a record for every role the reaper drops.
	Audit *audit.Logger
	// OnReap, when set, hears the outcome of every pass of Run (metrics).
	OnReap func(ReapReport, error)
}

// Issuer is the authority over the postgres engine's roles. It is safe
// for concurrent use.
type Issuer struct {
	admin *pgengine.Admin
	opts  Options
}

// Defaults.
const (
	DefaultReapInterval   = 30 * time.Second
	DefaultUntrackedGrace = time.Minute
	// reapCallTimeout bounds the reaper's work on one role or listing.
	reapCallTimeout = 30 * time.Second
)

// New checks o.Config and returns an Issuer. It connects lazily.
func New(o Options) (*Issuer, error) {
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.ReapInterval <= 0 {
		o.ReapInterval = DefaultReapInterval
	}
	if o.UntrackedGrace <= 0 {
		o.UntrackedGrace = DefaultUntrackedGrace
	}
	a, err := pgengine.NewAdmin(o.Config)
	if err != nil {
		return nil, err
	}
	return &Issuer{admin: a, opts: o}, nil
}

// Close closes the admin connections.
func (i *Issuer) Close() { i.admin.Close() }

// Mint decides whether r's pod may have the role it asks for (the
// configuration's allowed list and TTL bounds, then PodCheck), records
// the credential as issuing, refuses a volume whose credential was
// withdrawn (Withdrawals: the kill switch), creates the role (counting
// maxLive under a lock) and records it as issued. A refusal leaves
// nothing behind.
func (i *Issuer) Mint(ctx context.Context, c Caller, r postgres.MintRequest) (postgres.Grant, error) {
	t, err := i.lookup(r.Params)
	if err != nil {
		return postgres.Grant{}, err
	}
	tag := pgengine.Tag{LeaseID: r.LeaseID, Role: t.ref(), Class: r.Class, Pod: r.Pod, Node: c.Node}
	ttl, err := check(t, tag, r)
	if err != nil {
		return postgres.Grant{}, err
	}
	if i.opts.PodCheck != nil {
		if err := i.opts.PodCheck(ctx, c, r.Pod, r.Class, r.VolumeID); err != nil {
			return postgres.Grant{}, err
		}
	}
	e := credential.Record{
		LeaseID: r.LeaseID, VolumeID: r.VolumeID, Pod: r.Pod, Node: c.Node, Class: r.Class, Provider: postgres.Name,
		Role: r.Params[postgres.ConnectionParam] + "/" + r.Params[postgres.RoleParam], Name: postgres.RoleName(r.LeaseID),
	}
	inv := i.opts.Inventory
	if inv != nil {
		if err := inv.Issuing(ctx, e); err != nil {
			return postgres.Grant{}, fmt.Errorf("%w: recording the credential: %w", provider.ErrUnavailable, err)
		}
	}
	if err := i.withdrawn(ctx, r); err != nil {
		if derr := inv.Dropped(ctx, r.LeaseID); derr != nil {
			klog.ErrorS(derr, "Removing the record of a refused credential; the reaper finds no role for it", "lease", r.LeaseID)
		}
		return postgres.Grant{}, err
	}
	now := i.opts.Now().UTC().Truncate(time.Second)
	tag.Created = now
	cr := pgengine.Creation{
		Connection: t.connName, Role: t.roleName, Name: e.Name, Verifier: r.Verifier,
		ExpiresAt: now.Add(ttl), Tag: tag,
	}
	cr.Quota, cr.Admit = i.quota(t, r.Pod)
	if err := i.admin.Create(ctx, cr); err != nil {
		if inv != nil && nothingMade(err) {
			if derr := inv.Dropped(ctx, r.LeaseID); derr != nil {
				klog.ErrorS(derr, "Removing the record of a refused credential; the reaper finds no role for it", "lease", r.LeaseID)
			}
		}
		return postgres.Grant{}, err
	}
	g := grant(t, e.Name, now, cr.ExpiresAt)
	if inv != nil {
		e.IssuedAt, e.ExpiresAt = g.IssuedAt, g.ExpiresAt
		// The role is recorded (issuing) already: a failure here leaves
		// a record that says less, never a role without one. A record
		// deleted meanwhile was killed (its revocation may have come
		// before the role): the role goes now, not at the reaper's pass.
		err := inv.Issued(ctx, e)
		if errors.Is(err, credential.ErrRecordGone) {
			if _, derr := i.admin.Drop(ctx, t.connName, g.Name, r.LeaseID, nil); derr != nil {
				klog.ErrorS(derr, "Dropping a role whose record was deleted as it was minted; the reaper drops it", "lease", r.LeaseID)
			}
			return postgres.Grant{}, fmt.Errorf("%w: the credential's record was deleted as it was issued (the kill switch or the pod's deletion)", provider.ErrPermissionDenied)
		}
		if err != nil {
			klog.ErrorS(err, "Recording an issued credential", "lease", r.LeaseID)
		}
	}
	return g, nil
}

// withdrawn refuses a mint for a volume whose credential was withdrawn
// (the Inventory's Withdrawals). It is asked after the mint is recorded:
// a tombstone written before that record is seen here, and one written
// after it comes with the deletion of the record (the inventory deletes a
// volume's live records with it), so no role outlives a kill.
func (i *Issuer) withdrawn(ctx context.Context, r postgres.MintRequest) error {
	w, ok := i.opts.Inventory.(Withdrawals)
	if !ok {
		return nil
	}
	gone, err := w.Withdrawn(ctx, r.Pod, r.VolumeID)
	switch {
	case err != nil:
		return fmt.Errorf("%w: checking whether the volume's credential was withdrawn: %w", provider.ErrUnavailable, err)
	case gone:
		return fmt.Errorf("%w: %w (pod %s/%s, volume %s)", provider.ErrPermissionDenied, ErrWithdrawn, r.Pod.Namespace, r.Pod.Name, r.VolumeID)
	}
	return nil
}

// nothingMade reports whether a failed mint certainly left no role: it
// was refused, or its transaction failed on a statement and rolled back.
func nothingMade(err error) bool {
	return errors.Is(err, provider.ErrPermissionDenied) || errors.Is(err, provider.ErrInvalidParameters) ||
		errors.Is(err, provider.ErrMisconfigured)
}

// Extend is the proof of life of a pod volume: the role must be r's (its
// tag names r's lease and pod), its pod must pass PodCheck (with the
// class the role was made for), and then its VALID UNTIL moves forward.
// Without an Extend the role reaches VALID UNTIL and the reaper drops it.
func (i *Issuer) Extend(ctx context.Context, c Caller, r postgres.ExtendRequest) (postgres.Grant, error) {
	name := r.Name
	if name == "" {
		name = postgres.RoleName(r.LeaseID)
	}
	conn := r.Params[postgres.ConnectionParam]
	tr, found, err := i.admin.Find(ctx, conn, name, r.LeaseID)
	if err != nil {
		return postgres.Grant{}, err
	}
	if !found {
		return postgres.Grant{}, fmt.Errorf("%w: role %s no longer exists", provider.ErrNotRenewable, name)
	}
	if err := sameNode(c, tr); err != nil {
		return postgres.Grant{}, err
	}
	if i.opts.PodCheck != nil {
		// The pod and class the role was made for, as its tag records
		// them; extension checks that r names the same pod.
		if err := i.opts.PodCheck(ctx, c, tr.Tag.Pod, tr.Tag.Class, r.VolumeID); err != nil {
			return postgres.Grant{}, err
		}
	}
	t, err := i.lookup(r.Params)
	if err != nil {
		return postgres.Grant{}, err
	}
	cur, err := i.admin.Extend(ctx, t.connName, t.roleName, name, r.LeaseID, i.extension(t, r))
	if err != nil {
		return postgres.Grant{}, err
	}
	g := grant(t, name, cur.Tag.Created, cur.ValidUntil)
	if inv := i.opts.Inventory; inv != nil {
		e := credential.Record{
			LeaseID: r.LeaseID, VolumeID: r.VolumeID, Pod: tr.Tag.Pod, Node: c.Node, Class: tr.Tag.Class,
			Provider: postgres.Name, Role: g.Role, Name: g.Name, IssuedAt: g.IssuedAt, ExpiresAt: g.ExpiresAt,
		}
		if err := inv.Issued(ctx, e); err != nil {
			klog.ErrorS(err, "Recording an extended credential", "lease", r.LeaseID)
		}
	}
	return g, nil
}

// Drop ends r's role (its sessions, what it owns, the role) and then its
// record. Params need only the connection (a kill switch has
// "connection/role" from the record). A role that is gone is dropped
// already; a role without the tag of r's lease is refused and left alone,
// and so is a node plugin's request for a role another node asked for.
func (i *Issuer) Drop(ctx context.Context, c Caller, r postgres.DropRequest) error {
	name := r.Name
	if name == "" {
		name = postgres.RoleName(r.LeaseID) // an issue interrupted before its answer was recorded
	}
	conn := r.Params[postgres.ConnectionParam]
	if c.Node != "" {
		tr, found, err := i.admin.Find(ctx, conn, name, r.LeaseID)
		if err != nil && !errors.Is(err, provider.ErrPermissionDenied) {
			return err
		}
		if found {
			if err := sameNode(c, tr); err != nil {
				return err
			}
		}
	}
	if _, err := i.admin.Drop(ctx, conn, name, r.LeaseID, nil); err != nil {
		return err
	}
	if inv := i.opts.Inventory; inv != nil {
		if err := inv.Dropped(ctx, r.LeaseID); err != nil {
			// The caller retries; the role is gone, so the retry only
			// removes the record.
			return fmt.Errorf("%w: removing the record of a dropped credential: %w", provider.ErrUnavailable, err)
		}
	}
	return nil
}

// Local is the Issuer as the node side's Minter in the same process: the
// caller is the driver itself (Caller{}).
func (i *Issuer) Local() postgres.Minter { return local{i} }

type local struct{ i *Issuer }

func (l local) Mint(ctx context.Context, r postgres.MintRequest) (postgres.Grant, error) {
	return l.i.Mint(ctx, Caller{}, r)
}

func (l local) Extend(ctx context.Context, r postgres.ExtendRequest) (postgres.Grant, error) {
	return l.i.Extend(ctx, Caller{}, r)
}

func (l local) Drop(ctx context.Context, r postgres.DropRequest) error {
	return l.i.Drop(ctx, Caller{}, r)
}
