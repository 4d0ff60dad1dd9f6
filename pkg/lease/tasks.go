package lease

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"

	"k8s.io/klog/v2"

	"github.com/ephemeral-secrets/csi-driver/pkg/audit"
	"github.com/ephemeral-secrets/csi-driver/pkg/credential"
	"github.com/ephemeral-secrets/csi-driver/pkg/lease/state"
	"github.com/ephemeral-secrets/csi-driver/pkg/lease/volume"
	"github.com/ephemeral-secrets/csi-driver/pkg/metrics"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// Errors of the lease socket's verbs; the socket maps them to HTTP codes.
var (
	ErrNoLeaseAPI  = errors.New("the volume's class gives it no lease socket")
	ErrWithdrawn   = errors.New("the volume's credential was withdrawn")
	ErrTaskExists  = errors.New("the task already has a lease")
	ErrUnknownTask = errors.New("no such task")
	ErrTaskLimit   = errors.New("the volume holds as many task leases as its class allows")
	ErrInvalidTask = state.ErrInvalidTask
)

// Sockets opens and closes the lease sockets of volumes whose class asks
// for one (pkg/leaseapi); the manager calls it as volumes come and go.
type Sockets interface {
	// Open listens on the volume's socket, owned by root and gid.
	Open(volumeID string, gid int) error
	// Close stops listening and removes the socket.
	Close(volumeID string)
}

// ValidTask reports whether id is a valid task ID.
func ValidTask(id string) error { return state.ValidTask(id) }

// Info is what a pod may know of its volume's lease: nothing secret.
type Info struct {
	VolumeID  string       `json:"-"`
	Pod       provider.Pod `json:"-"`
	LeaseID   string       `json:"leaseID,omitempty"`
	Provider  string       `json:"provider"`
	Role      string       `json:"role,omitempty"`
	State     string       `json:"state"`
	IssuedAt  time.Time    `json:"issuedAt,omitzero"`
	ExpiresAt time.Time    `json:"expiresAt,omitzero"`
	RenewedAt time.Time    `json:"renewedAt,omitzero"`
	Renewals  int          `json:"renewals"`
	Withdrawn string       `json:"withdrawn,omitempty"` // why
	MaxTasks  int          `json:"maxTasks"`
	Tasks     []TaskInfo   `json:"tasks"`
}

// TaskInfo is one task lease, as its pod sees it: nothing secret.
type TaskInfo struct {
	Task      string    `json:"task"`
	LeaseID   string    `json:"leaseID"`
	Role      string    `json:"role,omitempty"`
	State     string    `json:"state"`
	IssuedAt  time.Time `json:"issuedAt,omitzero"`
	ExpiresAt time.Time `json:"expiresAt,omitzero"`
	// Path is where the task's files are, relative to the volume.
	Path string `json:"path"`
}

// taskInfo renders the record of a task lease for its pod.
func taskInfo(r credential.Record) TaskInfo {
	return TaskInfo{Task: r.Task, LeaseID: r.LeaseID, Role: r.Role, State: r.State,
		IssuedAt: r.IssuedAt, ExpiresAt: r.ExpiresAt, Path: "tasks/" + r.Task}
}

// Info returns what the volume's pod may know of its lease and tasks.
func (m *Manager) Info(volumeID string) (Info, error) {
	v := m.vols.Get(volumeID)
	if v == nil {
		return Info{}, fmt.Errorf("%w: %s", ErrUnknownVolume, volumeID)
	}
	return infoOf(v.Meta()), nil
}

// infoOf renders the record of the volume's lease, and its tasks', for
// its pod.
func infoOf(meta Metadata) Info {
	r := volumeCredential(meta)
	in := Info{
		VolumeID: r.VolumeID, Pod: r.Pod, LeaseID: r.LeaseID, Provider: r.Provider, Role: r.Role,
		State: r.State, IssuedAt: r.IssuedAt, ExpiresAt: r.ExpiresAt, RenewedAt: r.RenewedAt,
		Renewals: meta.Renewals, Withdrawn: meta.WithdrawReason, MaxTasks: meta.MaxTasks, Tasks: []TaskInfo{},
	}
	if meta.State == StateWithdrawn {
		in.LeaseID = meta.WithdrawnLease
	}
	for _, id := range slices.Sorted(maps.Keys(meta.Tasks)) {
		in.Tasks = append(in.Tasks, taskInfo(taskCredential(meta, id, meta.Tasks[id])))
	}
	return in
}

// usable locks the volume for a verb of its lease socket and returns it,
// published, with a lease socket, not withdrawn.
func (m *Manager) usable(ctx context.Context, volumeID string) (*volume.Volume, *volume.Held, error) {
	h, err := m.lock(ctx, volumeID)
	if err != nil {
		return nil, nil, err
	}
	v := h.Volume()
	switch {
	case v == nil:
		err = fmt.Errorf("%w: %s", ErrUnknownVolume, volumeID)
	case !v.Meta().LeaseAPI:
		err = ErrNoLeaseAPI
	case v.Meta().State == StateWithdrawn:
		err = ErrWithdrawn
	}
	if err != nil {
		h.Unlock()
		return nil, nil, err
	}
	return v, h, nil
}

// providerOf returns the provider of the volume meta describes, for a verb
// of its lease socket.
func (m *Manager) providerOf(meta Metadata) (provider.Provider, error) {
	prov, ok := m.opts.Providers.Get(meta.Provider)
	if !ok {
		return nil, fmt.Errorf("%w: provider %q is not configured", provider.ErrUnavailable, meta.Provider)
	}
	return prov, nil
}

// RotateNow replaces the volume's credential with a fresh one at once:
// issued, swapped in atomically, the old one revoked after the rotation
// grace.
func (m *Manager) RotateNow(ctx context.Context, volumeID string) (Info, error) {
	v, h, err := m.usable(ctx, volumeID)
	if err != nil {
		return Info{}, err
	}
	defer h.Unlock()
	prov, err := m.providerOf(v.Meta())
	if err != nil {
		return Info{}, err
	}
	cctx, cancel := context.WithTimeout(ctx, m.opts.BackendTimeout)
	defer cancel()
	if err := m.rotate(cctx, h, prov, v, true); err != nil {
		return Info{}, err
	}
	return infoOf(v.Meta()), nil
}

// IssueTask issues a separate lease for one task of the volume's pod,
// rendered like the volume's own under tasks/<task>/. It lives ttl (the
// class's TTL when zero or longer) and is not renewed: it is revoked at
// its end, at RevokeTask, or with its volume. It is recorded before it is
// issued, so that a crash at any point revokes it.
func (m *Manager) IssueTask(ctx context.Context, volumeID, task string, ttl time.Duration) (TaskInfo, error) {
	if err := ValidTask(task); err != nil {
		return TaskInfo{}, err
	}
	v, h, err := m.usable(ctx, volumeID)
	if err != nil {
		return TaskInfo{}, err
	}
	defer h.Unlock()
	m.endExpiredTasks(h, v)
	meta := v.Meta()
	if _, ok := meta.Tasks[task]; ok {
		return TaskInfo{}, fmt.Errorf("%w: %s", ErrTaskExists, task)
	}
	if len(meta.Tasks) >= meta.MaxTasks {
		return TaskInfo{}, fmt.Errorf("%w (%d)", ErrTaskLimit, meta.MaxTasks)
	}
	prov, err := m.providerOf(meta)
	if err != nil {
		return TaskInfo{}, err
	}
	leaseID := state.NewLeaseID(meta.Pod)
	rec := recordFor(meta, provider.Lease{ID: leaseID})
	rec.Task = task
	fail := func(err error) (TaskInfo, error) {
		m.audit(withStage(rec, audit.Failure), audit.Error, err)
		m.opts.Metrics.LeaseOp(meta.Provider, metrics.OpIssue, metrics.Error)
		return TaskInfo{}, err
	}
	// The intent first.
	if err := m.setTask(h, v, task, &Task{LeaseID: leaseID, State: StateIssuing}); err != nil {
		return fail(fmt.Errorf("recording the task: %w", err))
	}
	l, err := m.issue(ctx, prov, meta, leaseID, v.Tokens(), "", nil, false)
	undo := func(l provider.Lease, cause error) (TaskInfo, error) {
		if l.ID != "" {
			m.enqueueOrLog(l, v.Meta(), "task issue failed")
		}
		if err := m.opts.Store.DeleteLease(volumeID, leaseID); err != nil {
			klog.ErrorS(err, "Removing the record of a failed task lease", "leaseID", leaseID)
		}
		if err := m.setTask(h, v, task, nil); err != nil {
			klog.ErrorS(err, "Clearing a failed task's record; recovery revokes it", "volumeID", volumeID)
		}
		return fail(cause)
	}
	if err != nil {
		return undo(l, err)
	}
	end := l.ExpiresAt
	if ttl > 0 && (end.IsZero() || m.clock.Now().Add(ttl).Before(end)) {
		end = m.clock.Now().Add(ttl).UTC()
	}
	if err := m.opts.Store.WriteLease(volumeID, l); err != nil {
		return undo(l, fmt.Errorf("recording the task lease: %w", err))
	}
	v.SetTask(h, task, l)
	if err := m.writeFiles(h, v, v.Lease()); err != nil {
		v.EndTask(h, task)
		return undo(l, err)
	}
	t := Task{LeaseID: leaseID, State: StatePublished, Role: l.Role, IssuedAt: l.IssuedAt, ExpiresAt: end}
	if err := m.setTask(h, v, task, &t); err != nil {
		v.EndTask(h, task)
		_ = m.writeFiles(h, v, v.Lease())
		return undo(l, fmt.Errorf("recording the task: %w", err))
	}
	m.armTask(h, v, task, end)
	tl := l
	tl.ExpiresAt = end
	m.noteIssued(v.Meta(), tl)
	rec.Role = l.Role
	m.audit(withExpiry(withStage(rec, audit.Issue), end), audit.Success, nil)
	m.opts.Metrics.LeaseOp(meta.Provider, metrics.OpIssue, metrics.Success)
	m.opts.Metrics.Issued(meta.Pod.Namespace, meta.Pod.ServiceAccount, meta.Provider)
	return taskInfo(taskCredential(v.Meta(), task, t)), nil
}

// RevokeTask ends a task's lease: its files removed at once, its
// revocation queued. confirmed reports the backend's confirmation as
// Withdraw's does.
func (m *Manager) RevokeTask(ctx context.Context, volumeID, task string) (confirmed <-chan error, err error) {
	if err := ValidTask(task); err != nil {
		return nil, err
	}
	v, h, err := m.usable(ctx, volumeID)
	if err != nil {
		return nil, err
	}
	defer h.Unlock()
	t, ok := v.Meta().Tasks[task]
	if !ok {
		return nil, fmt.Errorf("%w: %s", ErrUnknownTask, task)
	}
	ids := []string{t.LeaseID}
	m.revocations.Watch(ids)
	if err := m.endTask(h, v, task, "task done"); err != nil {
		m.revocations.Unwatch(ids)
		return nil, err
	}
	return m.revocations.Await(m.ctx.Done(), ids), nil
}

// endTask ends one task lease of v: the record says it ended first (a
// lease record no task names is revoked by recovery), then its files go,
// then its revocation is queued and its record dropped.
func (m *Manager) endTask(h *volume.Held, v *volume.Volume, task, reason string) error {
	before := v.Meta() // names the task, for the audit of its revocation
	t, ok := before.Tasks[task]
	if !ok {
		return nil
	}
	if err := m.setTask(h, v, task, nil); err != nil {
		return fmt.Errorf("recording the task's end: %w", err)
	}
	l, had := v.EndTask(h, task)
	if before.State != StateWithdrawn {
		if err := m.writeFiles(h, v, v.Lease()); err != nil {
			klog.ErrorS(err, "Removing an ended task's files", "volumeID", before.VolumeID, "task", task)
		}
	}
	if !had {
		l = before.Named(t.LeaseID)
	}
	if !m.dropRecord(l, before, reason, time.Time{}) {
		return fmt.Errorf("queueing the revocation of task %s failed; recovery retries", task)
	}
	return nil
}

// setTask records t as task's record in v's metadata (nil: none).
func (m *Manager) setTask(h *volume.Held, v *volume.Volume, task string, t *Task) error {
	meta := v.Meta().WithTask(task, t)
	if err := m.opts.Store.WriteMetadata(meta); err != nil {
		return err
	}
	v.SetMeta(h, meta)
	return nil
}

// armTask ends task at end.
func (m *Manager) armTask(h *volume.Held, v *volume.Volume, task string, end time.Time) {
	if end.IsZero() || m.ctx.Err() != nil {
		return
	}
	id := v.ID()
	v.ArmTask(h, task, end.Sub(m.clock.Now()), func() {
		h, err := m.vols.Lock(m.ctx, id)
		if err != nil {
			return
		}
		defer h.Unlock()
		if cur := h.Volume(); cur != nil {
			m.endExpiredTasks(h, cur)
		}
	})
}

// endExpiredTasks ends the tasks of v whose time is up.
func (m *Manager) endExpiredTasks(h *volume.Held, v *volume.Volume) {
	now := m.clock.Now()
	tasks := v.Meta().Tasks
	for _, id := range slices.Sorted(maps.Keys(tasks)) {
		t := tasks[id]
		if t.State == StatePublished && !t.ExpiresAt.IsZero() && !now.Before(t.ExpiresAt) {
			if err := m.endTask(h, v, id, "task TTL reached"); err != nil {
				klog.ErrorS(err, "Ending an expired task", "volumeID", v.ID(), "task", id)
			}
		}
	}
}
