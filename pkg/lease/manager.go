// Package lease manages the life of every credential on the node: issue
// at publish, renewal on its own timer, rotation where renewal is
// impossible, withdrawal, task leases, and recovery of all of it after a
// driver restart. Beneath it, each a package of its own that does not
// import it: its records and their codec (pkg/lease/state), the in-memory
// state of each volume and its lock (pkg/lease/volume), the durable
// revocation queue, retried until the backend confirms
// (pkg/lease/revocation), and the outbox of the calls that record each
// lease in the cluster's inventory (pkg/lease/outbox).
//
// One lock discipline, enforced by pkg/lease/volume's types. Locks, in
// the order they are taken, never the other way round:
//
//  1. A volume's lock (volume.Table.Lock hands out a *volume.Held): held
//     for a whole operation on the volume (publish, unpublish, a renewal, a
//     rotation, a withdrawal, a task verb, its recovery or sweep); its
//     backend calls and file writes are made under it. Only its holder
//     changes the volume or arms its timers: each mutator of volume.Volume
//     takes the *volume.Held, and panics on a nil, released or other
//     volume's one. A timer's function takes the lock again. Never two
//     volumes' locks at once.
//  2. Locks of their own: the first-seen record's (state.Seen: held to
//     check and write that one record, so that its writes land in order),
//     the revocation queue's and the outbox's; taken with a volume's lock or
//     without. Nothing of the manager is called under them.
//  3. Leaves: the mutex of the table of volumes and each volume's, taken
//     inside pkg/lease/volume for a few instructions, with no file write,
//     backend call, wait or other lock under them. There is no other
//     manager-wide mutex: a reader (State, Info, Live, PodOf) takes only
//     leaves, and never waits for a backend or an operation on a volume.
//
// It imports pkg/storage, pkg/lease/state, pkg/lease/volume,
// pkg/lease/revocation, pkg/lease/outbox, pkg/provider (the contract it
// calls), pkg/credential (the record of a live credential: `inventory`,
// the records, the audit and the lease socket render from it),
// pkg/render, pkg/spc, pkg/audit and pkg/metrics; pkg/driver,
// pkg/leaseapi and pkg/cli import it.
package lease

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"k8s.io/klog/v2"
	"k8s.io/utils/clock"

	"github.com/ephemeral-secrets/csi-driver/pkg/audit"
	"github.com/ephemeral-secrets/csi-driver/pkg/lease/outbox"
	"github.com/ephemeral-secrets/csi-driver/pkg/lease/revocation"
	"github.com/ephemeral-secrets/csi-driver/pkg/lease/state"
	"github.com/ephemeral-secrets/csi-driver/pkg/lease/volume"
	"github.com/ephemeral-secrets/csi-driver/pkg/metrics"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/render"
	"github.com/ephemeral-secrets/csi-driver/pkg/spc"
	"github.com/ephemeral-secrets/csi-driver/pkg/storage"
)

// Errors the gRPC edge maps to CSI codes.
var (
	// ErrIncompatible: the volume is already published with other arguments.
	ErrIncompatible = errors.New("volume already published with different arguments")
	// ErrUnknownProvider: the class names a provider this driver lacks.
	ErrUnknownProvider = errors.New("unknown provider")
	// ErrNotReady: recovery after start-up has not finished.
	ErrNotReady = errors.New("driver is still recovering its state")
)

// Options configure a Manager. Zero durations take the defaults.
type Options struct {
	Store     Store
	Providers *provider.Registry
	Classes   spc.Resolver
	Audit     *audit.Logger

	// RenewFraction of a lease's TTL, counted from when it was granted
	// (issued or last renewed), after which it is renewed (default 2/3),
	// less up to Jitter of that (default 0.1).
	RenewFraction float64
	Jitter        float64
	// RetryMin and RetryMax bound the backoff of failed renewals and
	// revocations (defaults 1 s and 1 min). A failed renewal is retried
	// after at most a quarter of the time its lease has left, and every
	// RetryMin in the lease's last minute.
	RetryMin, RetryMax time.Duration
	// RotationGrace is how long a rotated-out lease stays valid before its
	// revocation, never past its own expiry: a reader that read the files
	// just before the swap still logs in with what it read (default 5 s;
	// negative: revoke at once).
	RotationGrace time.Duration
	// BackendTimeout bounds one call to a provider (default 30 s).
	BackendTimeout time.Duration
	// SweepInterval is how often volumes whose target vanished are looked
	// for (default 1 min).
	SweepInterval time.Duration
	// VerifyTarget is called before anything is mounted on a target, as
	// close to the mount as possible: the driver checks there that no
	// symbolic link leads the mount out of the pod's directory. Nil
	// accepts every target.
	VerifyTarget func(target string) error
	// Metrics counts lease operations; nil counts nothing.
	Metrics *metrics.Metrics
	// Render bounds the rendering of a volume's files (zero: the defaults).
	Render render.Limits
	// Sockets serves the lease sockets of volumes whose class asks for
	// one; nil serves none (such a publish is refused).
	Sockets Sockets
	// Records records each lease outside the node (the cluster's
	// inventory) as it is issued, renewed and revoked; nil records none.
	Records Records
	// RevocationWorkers is how many revocations run at once (default 8):
	// a backlog left by a backend outage drains in parallel.
	RevocationWorkers int
	// Clock times renewals, retries, task ends, the sweep and the queues
	// (default: the system's).
	Clock clock.WithTickerAndDelayedExecution
}

// Volume is what NodePublishVolume asks for, validated by the caller.
type Volume struct {
	ID         string
	TargetPath string
	ReadOnly   bool
	// MountGroup is volume_mount_group as given; GID is it parsed, or -1.
	MountGroup string
	GID        int
	// Attributes is the volume context less the service-account tokens,
	// which change on every republish.
	Attributes map[string]string
	Mount      spc.Mount
}

// Manager runs the lifecycle of the node's leases.
type Manager struct {
	opts   Options
	clock  clock.WithTickerAndDelayedExecution
	timing volume.Timing
	vols   volume.Table // the published volumes, each with its lock
	ready  atomic.Bool  // recovery has finished
	seen   state.Seen   // who asked first for what

	ctx    context.Context // cancelled by Close; bounds background work
	cancel context.CancelFunc

	revocations *revocation.Queue
	records     *outbox.Outbox // calls of opts.Records not yet made
}

// New returns a Manager. Call Recover, then Run.
func New(opts Options) *Manager {
	if opts.RenewFraction <= 0 || opts.RenewFraction >= 1 {
		opts.RenewFraction = 2.0 / 3
	}
	if opts.Jitter < 0 || opts.Jitter >= 1 {
		opts.Jitter = 0.1
	}
	if opts.RotationGrace == 0 {
		opts.RotationGrace = 5 * time.Second
	}
	if opts.RetryMin <= 0 {
		opts.RetryMin = time.Second
	}
	if opts.RetryMax <= 0 {
		opts.RetryMax = time.Minute
	}
	if opts.BackendTimeout <= 0 {
		opts.BackendTimeout = 30 * time.Second
	}
	if opts.SweepInterval <= 0 {
		opts.SweepInterval = time.Minute
	}
	if opts.Providers == nil {
		opts.Providers = &provider.Registry{}
	}
	if opts.Clock == nil {
		opts.Clock = clock.RealClock{}
	}
	ctx, cancel := context.WithCancel(context.Background())
	m := &Manager{
		opts: opts, clock: opts.Clock, ctx: ctx, cancel: cancel,
		timing: volume.Timing{RenewFraction: opts.RenewFraction, Jitter: opts.Jitter, RotationGrace: opts.RotationGrace,
			RetryMin: opts.RetryMin, RetryMax: opts.RetryMax},
	}
	m.records = outbox.New(outbox.Options{
		Records: opts.Records, Metrics: opts.Metrics, RetryMin: opts.RetryMin, RetryMax: opts.RetryMax,
		Timeout: opts.BackendTimeout, Gone: m.withdrawGone, Clock: opts.Clock,
	})
	m.revocations = revocation.New(revocation.Options{
		Store: opts.Store, Providers: opts.Providers, Audit: opts.Audit, Metrics: opts.Metrics,
		Workers: opts.RevocationWorkers, RetryMin: opts.RetryMin, RetryMax: opts.RetryMax,
		BackendTimeout: opts.BackendTimeout, Revoked: m.noteRevoked, Clock: opts.Clock,
	})
	return m
}

// Ready reports whether recovery has finished.
func (m *Manager) Ready() bool { return m.ready.Load() }

// Close stops renewals and background work. Leases stay alive and are
// picked up again by the next Recover.
func (m *Manager) Close() {
	m.cancel()
	m.revocations.Close()
	m.vols.Close()
}

// lock waits for a volume's lock, once recovery has finished.
func (m *Manager) lock(ctx context.Context, id string) (*volume.Held, error) {
	if !m.Ready() {
		// Until recovery has loaded every volume, "unknown" cannot be told
		// from "not loaded yet"; kubelet retries.
		return nil, fmt.Errorf("%w: %w", provider.ErrUnavailable, ErrNotReady)
	}
	h, err := m.vols.Lock(ctx, id)
	if err != nil {
		return nil, fmt.Errorf("%w: waiting for another operation on the volume: %w", provider.ErrUnavailable, err)
	}
	return h, nil
}

// Publish issues a lease for v and mounts its files on v.TargetPath, or,
// when v is already published, checks it is the same request and that it
// is still mounted (a republish: no backend call unless a renewal is due).
func (m *Manager) Publish(ctx context.Context, v Volume) error {
	h, err := m.lock(ctx, v.ID)
	if err != nil {
		return err
	}
	defer h.Unlock()
	cur, err := m.loaded(ctx, h)
	if err != nil {
		return fmt.Errorf("%w: recovering the volume's earlier record: %w", provider.ErrUnavailable, err)
	}
	if cur != nil {
		return m.republish(h, cur, v)
	}
	return m.publishNew(ctx, h, v)
}

// loaded returns the locked volume, recovering it first if the store has
// it and memory does not (its recovery failed, or a clean-up did): a new
// publish would otherwise write over its record.
func (m *Manager) loaded(ctx context.Context, h *volume.Held) (*volume.Volume, error) {
	if cur := h.Volume(); cur != nil {
		return cur, nil
	}
	if _, err := m.opts.Store.ReadMetadata(h.ID()); errors.Is(err, storage.ErrVolumeNotFound) {
		return nil, nil
	}
	if _, err := m.recoverVolume(ctx, h); err != nil {
		return nil, err
	}
	return h.Volume(), nil
}

func (m *Manager) republish(h *volume.Held, cur *volume.Volume, v Volume) error {
	meta := cur.Meta()
	if meta.TargetPath != v.TargetPath || meta.ReadOnly != v.ReadOnly ||
		meta.MountGroup != v.MountGroup || !maps.Equal(meta.Attributes, v.Attributes) {
		return ErrIncompatible
	}
	if len(v.Mount.Tokens) > 0 {
		cur.SetTokens(h, v.Mount.Tokens)
	}
	renewAt := cur.RenewAt()
	overdue := !renewAt.IsZero() && m.clock.Now().After(renewAt) && cur.Failures() == 0 && meta.State != StateWithdrawn
	if !m.opts.Store.IsMounted(v.TargetPath) {
		if err := m.mount(v.ID, v.TargetPath); err != nil {
			// Never a final code on republish: kubelet would tear the pod's mount down.
			return fmt.Errorf("%w: restoring the mount: %w", provider.ErrUnavailable, err)
		}
		klog.InfoS("Restored missing mount on republish", "volumeID", v.ID)
	}
	if overdue {
		m.schedule(h, cur, 0) // our timer is late (a suspended node?); kubelet's call is the hint
	}
	return nil
}

func (m *Manager) publishNew(ctx context.Context, h *volume.Held, v Volume) error {
	pod := v.Mount.Pod
	rec := audit.Record{Stage: audit.Request, VolumeID: v.ID, Pod: pod, Class: pod.Namespace + "/" + v.Mount.Class}
	rec.FirstSeen = m.firstSeen(pod, v.Mount.Class)
	m.audit(rec, audit.Success, nil)
	rec.FirstSeen = false

	fail := func(err error) error {
		m.audit(withStage(rec, audit.Failure), audit.Error, err)
		if rec.Provider != "" {
			m.opts.Metrics.LeaseOp(rec.Provider, metrics.OpIssue, metrics.Error)
			if errors.Is(err, provider.ErrPermissionDenied) {
				m.opts.Metrics.AuthFailure(rec.Provider)
			}
		}
		return err
	}
	if m.opts.VerifyTarget != nil { // early, to mint nothing for a bad target; again at the mount
		if err := m.opts.VerifyTarget(v.TargetPath); err != nil {
			return fail(err)
		}
	}
	class, err := m.opts.Classes.Resolve(ctx, pod.Namespace, v.Mount.Class)
	if err != nil {
		return fail(err)
	}
	rec.Provider = class.Provider
	prov, ok := m.opts.Providers.Get(class.Provider)
	if !ok {
		return fail(fmt.Errorf("%w: class %s names provider %q; this driver has %s", ErrUnknownProvider,
			class.Ref(), class.Provider, strings.Join(m.opts.Providers.Names(), ", ")))
	}
	spec, err := render.ParseSpecWithin(class.Parameters, m.opts.Render)
	if err != nil {
		return fail(fmt.Errorf("class %s: %w", class.Ref(), err))
	}
	if spec.LeaseAPI && m.opts.Sockets == nil {
		return fail(fmt.Errorf("class %s: %w: %s is not enabled on this node", class.Ref(), render.ErrInvalidSpec, render.LeaseAPIParam))
	}
	params := map[string]string{}
	for k, val := range class.Parameters {
		if !render.IsParam(k) {
			params[k] = val
		}
	}
	leaseID := state.NewLeaseID(pod)
	now := m.clock.Now().UTC()
	meta := Metadata{
		VolumeID: v.ID, TargetPath: v.TargetPath, ReadOnly: v.ReadOnly, MountGroup: v.MountGroup,
		Attributes: v.Attributes, Class: class.Ref(), Provider: class.Provider, Pod: pod,
		PendingLeaseID: leaseID, Params: params, State: StateIssuing, CreatedAt: now,
		LeaseAPI: spec.LeaseAPI, MaxTasks: spec.MaxTasks,
	}
	// The volume's tmpfs first (a crash now leaves a directory without a
	// record, which recovery removes), then the intent, before the backend
	// is asked, so that a crash from there on can still find and revoke
	// whatever Issue created.
	if err := m.opts.Store.CreateVolume(v.ID, v.GID); err != nil {
		if derr := m.opts.Store.DeleteVolume(v.ID); derr != nil {
			klog.ErrorS(derr, "Cleaning up after a failed publish", "volumeID", v.ID)
		}
		return fail(err)
	}
	undo := func(l provider.Lease, cause error) error {
		if l.ID != "" {
			m.enqueueOrLog(l, meta, "publish failed")
		}
		if spec.LeaseAPI {
			m.opts.Sockets.Close(v.ID)
		}
		if err := m.opts.Store.DeleteVolume(v.ID); err != nil {
			klog.ErrorS(err, "Cleaning up after a failed publish", "volumeID", v.ID)
		}
		return fail(cause)
	}
	if err := m.opts.Store.WriteMetadata(meta); err != nil {
		return undo(provider.Lease{}, fmt.Errorf("recording the volume: %w", err))
	}

	asked := m.clock.Now()
	l, err := m.issue(ctx, prov, meta, leaseID, v.Mount.Tokens, v.ID, nil, false)
	if err != nil {
		return undo(l, err)
	}
	rec.LeaseID, rec.Role = l.ID, l.Role
	if err := m.opts.Store.WriteLease(v.ID, l); err != nil {
		return undo(l, fmt.Errorf("recording the lease: %w", err))
	}
	files, err := spec.RenderVolume(l, nil)
	if err != nil {
		return undo(l, fmt.Errorf("class %s: %w", class.Ref(), err))
	}
	if err := m.opts.Store.WriteFiles(v.ID, v.GID, files); err != nil {
		return undo(l, err)
	}
	if spec.LeaseAPI { // before the mount: the pod finds its socket from its start
		if err := m.opts.Sockets.Open(v.ID, v.GID); err != nil {
			return undo(l, fmt.Errorf("opening the lease socket: %w", err))
		}
	}
	if err := m.mount(v.ID, v.TargetPath); err != nil {
		return undo(l, err)
	}
	meta.State, meta.LeaseID, meta.PendingLeaseID = StatePublished, l.ID, ""
	meta.Role, meta.IssuedAt, meta.ExpiresAt, meta.GrantTTL = l.Role, l.IssuedAt, l.ExpiresAt, state.GrantTTL(l, asked)
	if err := m.opts.Store.WriteMetadata(meta); err != nil {
		_ = m.opts.Store.UnmountTarget(v.TargetPath)
		return undo(l, fmt.Errorf("recording the volume: %w", err))
	}
	granted := l.IssuedAt
	if granted.IsZero() {
		granted = asked
	}
	vol := volume.New(m.clock, volume.Initial{Meta: meta, Lease: l, Spec: spec, GID: v.GID, Tokens: v.Mount.Tokens,
		Granted: granted, Digest: volume.Digest(files)})
	h.Put(vol)
	m.scheduleRenewal(h, vol)
	m.noteIssued(meta, l)
	m.audit(withExpiry(withStage(rec, audit.Issue), l.ExpiresAt), audit.Success, nil)
	m.opts.Metrics.LeaseOp(class.Provider, metrics.OpIssue, metrics.Success)
	m.opts.Metrics.Issued(pod.Namespace, pod.ServiceAccount, class.Provider)
	return nil
}

// mount verifies target, then binds the volume onto it.
func (m *Manager) mount(id, target string) error {
	if m.opts.VerifyTarget != nil {
		if err := m.opts.VerifyTarget(target); err != nil {
			return err
		}
	}
	return m.opts.Store.Mount(id, target)
}

// issue asks prov for lease id, for the volume (or, volumeID empty, a
// task of the volume) meta describes, in place of prior (nil: a new
// credential, see provider.Request.Prior; fresh: the pod asked for a new
// one, provider.Request.Fresh), and names the lease as the
// manager records it. A failed call returns the lease by ID alone where
// the backend may have acted before it failed (a timeout): revoking by
// ID, which is idempotent, rather than risk a leak.
func (m *Manager) issue(ctx context.Context, prov provider.Provider, meta Metadata, id string,
	tokens map[string]provider.Token, volumeID string, prior *provider.Lease, fresh bool) (provider.Lease, error) {
	ictx, cancel := context.WithTimeout(ctx, m.opts.BackendTimeout)
	defer cancel()
	l, err := prov.Issue(ictx, provider.Request{
		LeaseID: id, VolumeID: volumeID, Class: meta.Class, Params: meta.Params, Pod: meta.Pod, Tokens: tokens, Prior: prior, Fresh: fresh,
	})
	if err != nil {
		for _, definite := range []error{provider.ErrPermissionDenied, provider.ErrInvalidParameters, provider.ErrNotFound, provider.ErrMisconfigured} {
			if errors.Is(err, definite) {
				return provider.Lease{}, err
			}
		}
		return meta.Named(id), err
	}
	l.ID, l.Provider, l.Params = id, meta.Provider, meta.Params
	return l, nil
}

// firstSeen reports whether this is the first request on the node from
// the pod's namespace and service account for class, and remembers it.
func (m *Manager) firstSeen(pod provider.Pod, class string) bool {
	first, err := m.seen.First(m.opts.Store, pod, class, m.clock.Now().UTC())
	if err != nil {
		klog.ErrorS(err, "Recording a first-seen request")
	}
	if first {
		m.opts.Metrics.FirstSeen(pod.Namespace)
	}
	return first
}

// Unpublish unmounts target, queues the revocation of the volume's lease
// durably, deletes the files and returns without waiting for the backend.
// An unknown volume is fine.
func (m *Manager) Unpublish(ctx context.Context, volumeID, target string) error {
	h, err := m.lock(ctx, volumeID)
	if err != nil {
		return err
	}
	defer h.Unlock()
	v := h.Volume()
	if v == nil {
		return nil
	}
	if v.Meta().TargetPath != target {
		klog.InfoS("Unpublish of a target the volume is not published at; nothing to do", "volumeID", volumeID)
		return nil
	}
	if err := m.opts.Store.UnmountTarget(target); err != nil {
		return err
	}
	return m.retire(h, v, "unpublished")
}

// retire queues the revocation of every lease the volume holds, stops its
// renewals and deletes its files and metadata.
func (m *Manager) retire(h *volume.Held, v *volume.Volume, reason string) error {
	meta := v.Meta()
	if err := m.enqueueHeld(meta, v.Lease(), reason); err != nil {
		return err
	}
	m.revocations.Expedite(meta.VolumeID)
	h.Remove(v)
	if meta.LeaseAPI && m.opts.Sockets != nil {
		m.opts.Sockets.Close(meta.VolumeID)
	}
	if err := m.opts.Store.DeleteVolume(meta.VolumeID); err != nil {
		// The revocation is queued; the sweep removes the leftovers.
		klog.ErrorS(err, "Deleting volume files", "volumeID", meta.VolumeID)
	}
	return nil
}

func (m *Manager) audit(r audit.Record, outcome string, err error) {
	r.Outcome = outcome
	if err != nil {
		r.Error = err.Error()
	}
	if werr := m.opts.Audit.Log(r); werr != nil {
		klog.ErrorS(werr, "Writing audit record")
	}
}

func withStage(r audit.Record, s audit.Stage) audit.Record { r.Stage = s; return r }

func withExpiry(r audit.Record, t time.Time) audit.Record {
	if !t.IsZero() {
		t = t.UTC()
		r.ExpiresAt = &t
	}
	return r
}

// recordFor is the audit record of l, the lease of the volume meta or of
// one of its tasks: its credential's record, rendered.
func recordFor(meta Metadata, l provider.Lease) audit.Record {
	return audit.Of(recordOf(meta, l))
}

// ParseGID parses a volume_mount_group: empty is "none" (-1).
func ParseGID(s string) (int, error) {
	if s == "" {
		return -1, nil
	}
	g, err := strconv.ParseUint(s, 10, 31)
	if err != nil {
		return 0, fmt.Errorf("volume_mount_group %q is not a numeric group ID", s)
	}
	return int(g), nil
}
