package issuer

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"k8s.io/klog/v2"

	"github.com/ephemeral-secrets/csi-driver/pkg/audit"
	"github.com/ephemeral-secrets/csi-driver/pkg/credential"
	pgengine "github.com/ephemeral-secrets/csi-driver/pkg/issuer/postgres"
	"github.com/ephemeral-secrets/csi-driver/pkg/issuer/use"
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
	// Use, when its Interval is set, has Run observe the credentials' use.
	Use UseOptions
}

// Issuer is the authority over the postgres engine's roles. It is safe
// for concurrent use.
type Issuer struct {
	admin *pgengine.Admin
	opts  Options
	// records writes the Inventory's status of each credential off the
	// requests' path (nil without an Inventory).
	records *recordWriter
	// minting tells whether mints are under way or just were: the
	// status writes wait meanwhile.
	minting *mintActivity
	// use observes the credentials' use while Run runs (nil: not asked).
	use *use.Tracker
}

// Defaults.
const (
	DefaultReapInterval   = 30 * time.Second
	DefaultUntrackedGrace = time.Minute
	// reapCallTimeout bounds the reaper's work on one role or listing.
	reapCallTimeout = 30 * time.Second
	// undoTimeout bounds the taking back of a refused mint.
	undoTimeout = 10 * time.Second
)

// New checks o.Config and returns an Issuer. It connects lazily; with an
// Inventory, it starts the writers of the records' status (Close stops
// them).
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
	i := &Issuer{admin: a, opts: o, minting: newMintActivity(time.Now())}
	if o.Inventory != nil {
		i.records = newRecordWriter(o.Inventory, i.recordGone, recordWorkers, nil, deferral{
			busy: func() bool { return i.minting.busy(time.Now()) }, max: recordDefer, now: o.Now})
	}
	i.use = i.newTracker(o.Use)
	return i, nil
}

// Close writes the records' status still queued (for a few seconds at
// most), then closes the admin connections.
func (i *Issuer) Close() {
	if i.records != nil {
		i.records.close(recordDrain)
	}
	if i.use != nil {
		i.use.Close()
	}
	i.admin.Close()
}

// Mint decides whether r's pod may have the role it asks for (the
// configuration's allowed list and TTL bounds, then PodCheck), and then,
// at once, records the credential (Inventory.Issuing: the one write of
// the API server on a mint's path, then Withdrawals: whether the volume's
// credential was withdrawn, the kill switch) and creates the role
// (counting maxLive under a lock); it answers once both are done. The
// record's status (issued, until when) is written after the answer.
//
// The record and the role are made side by side, so a mint waits for the
// longer of the two, not their sum. A role may thus exist an instant
// before its record: the role is tagged with its lease, a record that
// fails has the role dropped before Mint answers, and a role left by a
// crash in between has no record, so the reaper drops it once it is
// older than UntrackedGrace. The pod is checked before either: nothing
// is made for a pod that is not the caller's. A refusal leaves nothing
// behind.
func (i *Issuer) Mint(ctx context.Context, c Caller, r postgres.MintRequest) (postgres.Grant, error) {
	i.minting.begin()
	defer func() { i.minting.end(time.Now()) }()
	t, err := i.lookup(r.Params)
	if err != nil {
		return postgres.Grant{}, err
	}
	tag := pgengine.Tag{LeaseID: r.LeaseID, Role: t.ref(), Class: r.Class, Pod: r.Pod, Node: c.Node, Volume: r.VolumeID}
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
	now := i.opts.Now().UTC().Truncate(time.Second)
	tag.Created = now
	cr := pgengine.Creation{
		Connection: t.connName, Role: t.roleName, Name: e.Name, Verifier: r.Verifier,
		ExpiresAt: now.Add(ttl), Tag: tag,
	}
	cr.Quota, cr.Admit = i.quota(t, r.Pod)
	var recorded chan error
	if i.opts.Inventory != nil {
		recorded = make(chan error, 1)
		go func() { recorded <- i.record(ctx, e) }()
	}
	err = i.admin.Create(ctx, cr)
	if recorded != nil {
		if rerr := <-recorded; rerr != nil {
			i.undo(ctx, t.connName, e, err == nil || !nothingMade(err))
			return postgres.Grant{}, rerr
		}
	}
	if err != nil {
		if nothingMade(err) {
			i.undo(ctx, t.connName, e, false)
		}
		return postgres.Grant{}, err
	}
	g := grant(t, e.Name, now, cr.ExpiresAt)
	if i.records != nil {
		// The record holds the role already: its status says more, soon.
		// A record deleted meanwhile was killed (its revocation may have
		// come before the role): the writer finds it gone and drops the
		// role then.
		e.IssuedAt, e.ExpiresAt = g.IssuedAt, g.ExpiresAt
		i.records.issued(e)
	}
	return g, nil
}

// record writes the record of a mint (Inventory.Issuing) and then asks
// whether its volume's credential was withdrawn (Withdrawals, when the
// Inventory tells): after the record, which is what the kill's ordering
// needs (withdrawn). Its error refuses the mint.
func (i *Issuer) record(ctx context.Context, e credential.Record) error {
	inv := i.opts.Inventory
	if err := inv.Issuing(ctx, e); err != nil {
		return fmt.Errorf("%w: recording the credential: %w", provider.ErrUnavailable, err)
	}
	if w, ok := inv.(Withdrawals); ok {
		return withdrawn(ctx, w, e)
	}
	return nil
}

// undo takes back a mint that is refused after its record or its role
// may have been made: the role, when one may have been made, then the
// record, once no role is left for it to hold (a role that cannot be
// dropped keeps its record, if it has one: the reaper drops it at its
// expiry, the controller at the pod's end; without one, the reaper drops
// it after UntrackedGrace). It outlives the mint's context (a mint whose
// caller went must not leave its role), for undoTimeout at most.
func (i *Issuer) undo(ctx context.Context, conn string, e credential.Record, roleMade bool) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), undoTimeout)
	defer cancel()
	if roleMade {
		if _, err := i.admin.Drop(ctx, conn, e.Name, e.LeaseID, nil); err != nil {
			klog.ErrorS(err, "Dropping the role of a refused credential; its record, or the reaper, holds it", "lease", e.LeaseID)
			return
		}
	}
	if inv := i.opts.Inventory; inv != nil {
		if err := inv.Dropped(ctx, e.LeaseID); err != nil {
			klog.ErrorS(err, "Removing the record of a refused credential; the reaper finds no role for it", "lease", e.LeaseID)
		}
	}
}

// recordGone ends the role of e, whose record the writer found deleted
// after the role was made (the kill switch or the pod's deletion while it
// was being minted, or extended): the record's revocation may have run
// before the role existed.
func (i *Issuer) recordGone(ctx context.Context, e credential.Record) {
	conn, _, _ := strings.Cut(e.Role, "/")
	dropped, err := i.admin.Drop(ctx, conn, e.Name, e.LeaseID, nil)
	if err != nil {
		klog.ErrorS(err, "Dropping a role whose record was deleted as it was issued; the reaper drops it", "lease", e.LeaseID)
		return
	}
	if dropped {
		klog.InfoS("Dropped a role whose record was deleted as it was issued (the kill switch or the pod's deletion)", "lease", e.LeaseID)
	}
}

// withdrawn refuses a mint for a volume whose credential was withdrawn
// (w, the Inventory's Withdrawals). It is asked after the mint is
// recorded: a tombstone written before that record is seen here, and one
// written after it comes with the deletion of the record (the inventory
// deletes a volume's live records with it), so no role outlives a kill.
func withdrawn(ctx context.Context, w Withdrawals, e credential.Record) error {
	gone, err := w.Withdrawn(ctx, e)
	switch {
	case err != nil:
		return fmt.Errorf("%w: checking whether the volume's credential was withdrawn: %w", provider.ErrUnavailable, err)
	case gone:
		return fmt.Errorf("%w: %w (pod %s/%s, volume %s)", provider.ErrPermissionDenied, ErrWithdrawn, e.Pod.Namespace, e.Pod.Name, e.VolumeID)
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
	if i.records != nil {
		// Off the path, as a mint's: the role is extended whatever the
		// record says; a record found deleted has the role dropped.
		i.records.issued(credential.Record{
			LeaseID: r.LeaseID, VolumeID: r.VolumeID, Pod: tr.Tag.Pod, Node: c.Node, Class: tr.Tag.Class,
			Provider: postgres.Name, Role: g.Role, Name: g.Name, IssuedAt: g.IssuedAt, ExpiresAt: g.ExpiresAt,
		})
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
	if i.records != nil {
		i.records.forget(r.LeaseID) // nothing more to say of it but that it is gone
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
