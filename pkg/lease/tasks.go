package lease

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"regexp"
	"slices"
	"time"

	"k8s.io/klog/v2"
	"k8s.io/utils/clock"

	"github.com/ephemeral-secrets/csi-driver/pkg/audit"
	"github.com/ephemeral-secrets/csi-driver/pkg/credential"
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
	ErrInvalidTask = errors.New("a task ID is 1 to 63 characters of a-z, 0-9 and -, starting and ending with a letter or digit")
)

// Sockets opens and closes the lease sockets of volumes whose class asks
// for one (pkg/leaseapi); the manager calls it as volumes come and go.
type Sockets interface {
	// Open listens on the volume's socket, owned by root and gid.
	Open(volumeID string, gid int) error
	// Close stops listening and removes the socket.
	Close(volumeID string)
}

var taskID = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)

// ValidTask reports whether id is a valid task ID.
func ValidTask(id string) error {
	if !taskID.MatchString(id) {
		return fmt.Errorf("%w: %q", ErrInvalidTask, id)
	}
	return nil
}

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
	m.mu.Lock()
	defer m.mu.Unlock()
	v := m.vols[volumeID]
	if v == nil {
		return Info{}, fmt.Errorf("%w: %s", ErrUnknownVolume, volumeID)
	}
	return infoOf(v.meta), nil
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
func (m *Manager) usable(ctx context.Context, volumeID string) (*volume, func(), error) {
	if !m.Ready() {
		return nil, nil, fmt.Errorf("%w: %w", provider.ErrUnavailable, ErrNotReady)
	}
	unlock, err := m.locks.Lock(ctx, volumeID)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: waiting for another operation on the volume: %w", provider.ErrUnavailable, err)
	}
	m.mu.Lock()
	v := m.vols[volumeID]
	m.mu.Unlock()
	switch {
	case v == nil:
		err = fmt.Errorf("%w: %s", ErrUnknownVolume, volumeID)
	case !v.meta.LeaseAPI:
		err = ErrNoLeaseAPI
	case v.meta.State == StateWithdrawn:
		err = ErrWithdrawn
	}
	if err != nil {
		unlock()
		return nil, nil, err
	}
	return v, unlock, nil
}

// RotateNow replaces the volume's credential with a fresh one at once:
// issued, swapped in atomically, the old one revoked after the rotation
// grace.
func (m *Manager) RotateNow(ctx context.Context, volumeID string) (Info, error) {
	v, unlock, err := m.usable(ctx, volumeID)
	if err != nil {
		return Info{}, err
	}
	defer unlock()
	prov, ok := m.opts.Providers.Get(v.meta.Provider)
	if !ok {
		return Info{}, fmt.Errorf("%w: provider %q is not configured", provider.ErrUnavailable, v.meta.Provider)
	}
	cctx, cancel := context.WithTimeout(ctx, m.opts.BackendTimeout)
	defer cancel()
	if err := m.rotate(cctx, prov, v); err != nil {
		return Info{}, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return infoOf(v.meta), nil
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
	v, unlock, err := m.usable(ctx, volumeID)
	if err != nil {
		return TaskInfo{}, err
	}
	defer unlock()
	m.endExpiredTasks(v)
	if _, ok := v.meta.Tasks[task]; ok {
		return TaskInfo{}, fmt.Errorf("%w: %s", ErrTaskExists, task)
	}
	if len(v.meta.Tasks) >= v.meta.MaxTasks {
		return TaskInfo{}, fmt.Errorf("%w (%d)", ErrTaskLimit, v.meta.MaxTasks)
	}
	prov, ok := m.opts.Providers.Get(v.meta.Provider)
	if !ok {
		return TaskInfo{}, fmt.Errorf("%w: provider %q is not configured", provider.ErrUnavailable, v.meta.Provider)
	}
	leaseID := newLeaseID(v.meta.Pod)
	rec := recordFor(v.meta, provider.Lease{ID: leaseID})
	rec.Task = task
	fail := func(err error) (TaskInfo, error) {
		m.audit(withStage(rec, audit.Failure), audit.Error, err)
		m.opts.Metrics.LeaseOp(v.meta.Provider, metrics.OpIssue, metrics.Error)
		return TaskInfo{}, err
	}
	// The intent first.
	if err := m.setTask(v, task, &Task{LeaseID: leaseID, State: StateIssuing}); err != nil {
		return fail(fmt.Errorf("recording the task: %w", err))
	}
	m.mu.Lock()
	tokens := v.tokens
	m.mu.Unlock()
	ictx, cancel := context.WithTimeout(ctx, m.opts.BackendTimeout)
	l, err := prov.Issue(ictx, provider.Request{
		LeaseID: leaseID, Class: v.meta.Class, Params: v.meta.Params, Pod: v.meta.Pod, Tokens: tokens,
	})
	cancel()
	l.ID, l.Provider, l.Params = leaseID, v.meta.Provider, v.meta.Params
	undo := func(l provider.Lease, cause error) (TaskInfo, error) {
		if l.ID != "" {
			m.enqueueOrLog(l, v.meta, "task issue failed")
		}
		if err := m.opts.Store.DeleteLease(volumeID, leaseID); err != nil {
			klog.ErrorS(err, "Removing the record of a failed task lease", "leaseID", leaseID)
		}
		if err := m.setTask(v, task, nil); err != nil {
			klog.ErrorS(err, "Clearing a failed task's record; recovery revokes it", "volumeID", volumeID)
		}
		return fail(cause)
	}
	if err != nil {
		if mayHaveIssued(err) {
			return undo(provider.Lease{ID: leaseID, Provider: v.meta.Provider, Params: v.meta.Params}, err)
		}
		return undo(provider.Lease{}, err)
	}
	end := l.ExpiresAt
	if ttl > 0 && (end.IsZero() || m.clock.Now().Add(ttl).Before(end)) {
		end = m.clock.Now().Add(ttl).UTC()
	}
	if err := m.opts.Store.WriteLease(volumeID, l); err != nil {
		return undo(l, fmt.Errorf("recording the task lease: %w", err))
	}
	m.mu.Lock()
	v.tasks[task] = l
	m.mu.Unlock()
	if err := m.writeFiles(v, v.lease); err != nil {
		m.mu.Lock()
		delete(v.tasks, task)
		m.mu.Unlock()
		return undo(l, err)
	}
	t := Task{LeaseID: leaseID, State: StatePublished, Role: l.Role, IssuedAt: l.IssuedAt, ExpiresAt: end}
	if err := m.setTask(v, task, &t); err != nil {
		m.mu.Lock()
		delete(v.tasks, task)
		m.mu.Unlock()
		_ = m.writeFiles(v, v.lease)
		return undo(l, fmt.Errorf("recording the task: %w", err))
	}
	m.armTask(v, task, end)
	tl := l
	tl.ExpiresAt = end
	m.noteIssued(v.meta, tl)
	rec.Role = l.Role
	m.audit(withExpiry(withStage(rec, audit.Issue), end), audit.Success, nil)
	m.opts.Metrics.LeaseOp(v.meta.Provider, metrics.OpIssue, metrics.Success)
	return taskInfo(taskCredential(v.meta, task, t)), nil
}

// RevokeTask ends a task's lease: its files removed at once, its
// revocation queued. confirmed reports the backend's confirmation as
// Withdraw's does.
func (m *Manager) RevokeTask(ctx context.Context, volumeID, task string) (confirmed <-chan error, err error) {
	if err := ValidTask(task); err != nil {
		return nil, err
	}
	v, unlock, err := m.usable(ctx, volumeID)
	if err != nil {
		return nil, err
	}
	defer unlock()
	t, ok := v.meta.Tasks[task]
	if !ok {
		return nil, fmt.Errorf("%w: %s", ErrUnknownTask, task)
	}
	ids := []string{t.LeaseID}
	m.revocations.Watch(ids)
	if err := m.endTask(v, task, "task done"); err != nil {
		m.revocations.Unwatch(ids)
		return nil, err
	}
	return m.revocations.Await(m.ctx.Done(), ids), nil
}

// endTask ends one task lease of v: the record says it ended first (a
// lease record no task names is revoked by recovery), then its files go,
// then its revocation is queued and its record dropped.
func (m *Manager) endTask(v *volume, task, reason string) error {
	before := v.meta // names the task, for the audit of its revocation
	t, ok := before.Tasks[task]
	if !ok {
		return nil
	}
	if err := m.setTask(v, task, nil); err != nil {
		return fmt.Errorf("recording the task's end: %w", err)
	}
	m.mu.Lock()
	l, had := v.tasks[task]
	delete(v.tasks, task)
	if tm := v.taskTimers[task]; tm != nil {
		tm.Stop()
		delete(v.taskTimers, task)
	}
	m.mu.Unlock()
	if v.meta.State != StateWithdrawn {
		if err := m.writeFiles(v, v.lease); err != nil {
			klog.ErrorS(err, "Removing an ended task's files", "volumeID", v.meta.VolumeID, "task", task)
		}
	}
	if !had {
		l = provider.Lease{ID: t.LeaseID, Provider: v.meta.Provider, Params: v.meta.Params}
	}
	if !m.dropRecord(l, before, reason, time.Time{}) {
		return fmt.Errorf("queueing the revocation of task %s failed; recovery retries", task)
	}
	return nil
}

// setTask records t as task's record in v's metadata (nil: none).
func (m *Manager) setTask(v *volume, task string, t *Task) error {
	meta := v.meta
	meta.Tasks = maps.Clone(meta.Tasks)
	if t == nil {
		delete(meta.Tasks, task)
	} else {
		if meta.Tasks == nil {
			meta.Tasks = map[string]Task{}
		}
		meta.Tasks[task] = *t
	}
	if len(meta.Tasks) == 0 {
		meta.Tasks = nil
	}
	if err := m.opts.Store.WriteMetadata(meta); err != nil {
		return err
	}
	m.mu.Lock()
	v.meta = meta
	m.mu.Unlock()
	return nil
}

// armTask ends task at end.
func (m *Manager) armTask(v *volume, task string, end time.Time) {
	if end.IsZero() {
		return
	}
	id := v.meta.VolumeID
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.ctx.Err() != nil {
		return
	}
	if v.taskTimers == nil {
		v.taskTimers = map[string]clock.Timer{}
	}
	if tm := v.taskTimers[task]; tm != nil {
		tm.Stop()
	}
	v.taskTimers[task] = m.after(end.Sub(m.clock.Now()), func() {
		unlock, err := m.locks.Lock(m.ctx, id)
		if err != nil {
			return
		}
		defer unlock()
		m.mu.Lock()
		cur := m.vols[id]
		m.mu.Unlock()
		if cur == nil {
			return
		}
		m.endExpiredTasks(cur)
	})
}

// endExpiredTasks ends the tasks of v whose time is up.
func (m *Manager) endExpiredTasks(v *volume) {
	now := m.clock.Now()
	for _, id := range slices.Sorted(maps.Keys(v.meta.Tasks)) {
		t := v.meta.Tasks[id]
		if t.State == StatePublished && !t.ExpiresAt.IsZero() && !now.Before(t.ExpiresAt) {
			if err := m.endTask(v, id, "task TTL reached"); err != nil {
				klog.ErrorS(err, "Ending an expired task", "volumeID", v.meta.VolumeID, "task", id)
			}
		}
	}
}

// stopTaskTimers stops v's task timers; under m.mu.
func (v *volume) stopTaskTimers() {
	for _, tm := range v.taskTimers {
		tm.Stop()
	}
	v.taskTimers = nil
}

// taskOf names the task whose lease leaseID is, or "".
func taskOf(meta Metadata, leaseID string) string {
	for id, t := range meta.Tasks {
		if t.LeaseID == leaseID {
			return id
		}
	}
	return ""
}
