// Package storage keeps each volume's files and metadata in memory (tmpfs):
// a size-capped tmpfs per volume bind-mounted read-only onto the pod's
// target path, atomic updates through a "..data" symlink, and the
// non-secret metadata and revocation queue in the driver's own tmpfs state
// directory, which survives a driver restart but not a reboot.
package storage

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"
	mount "k8s.io/mount-utils"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// Errors callers map to CSI codes.
var (
	ErrTooLarge       = errors.New("volume contents exceed the size cap")
	ErrVolumeNotFound = errors.New("volume not found")
)

// State of a volume's lease, recorded before each step so that a crash
// at any point can be finished or undone.
type State string

const (
	// StateIssuing: the lease ID is chosen and Issue may have run; the
	// lease may exist in the backend without being recorded yet.
	StateIssuing State = "issuing"
	// StatePublished: files are written and the lease is recorded.
	StatePublished State = "published"
	// StateWithdrawn: the volume's credential was taken back while its pod
	// runs (the pod gave it back, or an admin killed it). The volume stays
	// mounted and empty until its unpublish; nothing is issued for it again,
	// and every lease it held is revoked, after a restart too.
	StateWithdrawn State = "withdrawn"
)

// Metadata is what the driver records about a volume: nothing secret.
type Metadata struct {
	VolumeID   string            `json:"volumeID"`
	TargetPath string            `json:"targetPath"`
	ReadOnly   bool              `json:"readOnly"`
	MountGroup string            `json:"mountGroup,omitempty"`
	Attributes map[string]string `json:"attributes"` // volume context less tokens: for idempotency checks
	Class      string            `json:"class"`
	Provider   string            `json:"provider"`
	Pod        provider.Pod      `json:"pod"`
	LeaseID    string            `json:"leaseID"`
	// PendingLeaseID is set before a provider is asked to issue and cleared
	// once the lease is recorded: after a crash it names what to revoke.
	PendingLeaseID string            `json:"pendingLeaseID,omitempty"`
	Params         map[string]string `json:"params,omitempty"` // provider parameters, to revoke an interrupted issue
	Role           string            `json:"role,omitempty"`
	State          State             `json:"state"`
	CreatedAt      time.Time         `json:"createdAt"`
	IssuedAt       time.Time         `json:"issuedAt,omitzero"`
	ExpiresAt      time.Time         `json:"expiresAt,omitzero"`
	RenewedAt      time.Time         `json:"renewedAt,omitzero"`
	// GrantTTL is the lifetime the lease got when it was issued: renewal
	// keeps the same margin before expiry when a max TTL shortens a grant.
	GrantTTL time.Duration `json:"grantTTL,omitempty"`
	// LapseRecorded is the expiry of the lease whose lapse was last
	// audited, so that each lapse is recorded once, across restarts too.
	LapseRecorded time.Time `json:"lapseRecorded,omitzero"`
	// WithdrawnAt and WithdrawReason say when and why the volume was
	// withdrawn (StateWithdrawn).
	WithdrawnAt    time.Time `json:"withdrawnAt,omitzero"`
	WithdrawReason string    `json:"withdrawReason,omitempty"`
}

// Revocation is one entry of the durable revocation queue.
type Revocation struct {
	Lease      provider.Lease `json:"lease"` // may hold a secret handle: tmpfs only
	VolumeID   string         `json:"volumeID"`
	Class      string         `json:"class"`
	Pod        provider.Pod   `json:"pod"`
	Reason     string         `json:"reason"`
	EnqueuedAt time.Time      `json:"enqueuedAt"`
	// NotBefore delays the revocation (a rotated-out lease's grace).
	NotBefore time.Time `json:"notBefore,omitzero"`
	Attempts  int       `json:"attempts"`
	LastError string    `json:"lastError,omitempty"`
}

// File is one file of a volume.
type File struct {
	Path string
	Mode os.FileMode
	Data []byte
}

// MetadataReader reads volume records; all the lease manager's recovery needs.
type MetadataReader interface {
	ListVolumes() ([]string, error)
	ReadMetadata(volumeID string) (Metadata, error)
	// ReadLease returns the volume's current lease: the record of the
	// lease its metadata names.
	ReadLease(volumeID string) (provider.Lease, error)
	// ListLeases returns every lease record the volume holds: its current
	// lease and any that a rotation or an issue left on its way.
	ListLeases(volumeID string) ([]provider.Lease, error)
	ListRevocations() ([]Revocation, error)
}

// MetadataWriter records volume metadata and the revocation queue.
type MetadataWriter interface {
	// WriteRecord and ReadRecord keep a small named record of the node's
	// own (not a volume's), such as which identities asked for what.
	WriteRecord(name string, v any) error
	ReadRecord(name string, v any) error
	WriteMetadata(m Metadata) error
	// WriteLease records l, keyed by its ID: the records of other leases
	// of the volume stay until DeleteLease.
	WriteLease(volumeID string, l provider.Lease) error
	DeleteLease(volumeID, leaseID string) error
	PutRevocation(r Revocation) error
	DeleteRevocation(leaseID string) error
}

// DataWriter manages a volume's tmpfs, its files and its bind mount.
type DataWriter interface {
	CreateVolume(volumeID string, gid int) error
	WriteFiles(volumeID string, gid int, files []File) error
	Mount(volumeID, target string) error
	IsMounted(target string) bool
	UnmountTarget(target string) error
	DeleteVolume(volumeID string) error
}

// Options size a volume.
type Options struct {
	// MaxVolumeBytes caps the bytes of one volume's files (default 1 MiB).
	MaxVolumeBytes int64
	// MaxFiles caps the files of one volume (default 256).
	MaxFiles int
}

// Filesystem is the tmpfs-backed store.
type Filesystem struct {
	root    string
	opts    Options
	mounter mount.Interface
	umask   os.FileMode // the process's, read once: modes it cannot strip need no chmod
}

var (
	_ MetadataReader = (*Filesystem)(nil)
	_ MetadataWriter = (*Filesystem)(nil)
	_ DataWriter     = (*Filesystem)(nil)
)

// Open prepares root as the driver's state directory: created if absent
// and, unless it already is one, covered by a private tmpfs so nothing
// the driver records ever reaches a persistent disk.
func Open(root string, opts Options) (*Filesystem, error) {
	if opts.MaxVolumeBytes <= 0 {
		opts.MaxVolumeBytes = 1 << 20
	}
	if opts.MaxFiles <= 0 {
		opts.MaxFiles = 256
	}
	root = filepath.Clean(root)
	if err := os.MkdirAll(root, 0o700); err != nil {
		return nil, fmt.Errorf("state directory: %w", err)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(root, &st); err != nil {
		return nil, fmt.Errorf("state directory: %w", err)
	}
	if st.Type != unix.TMPFS_MAGIC {
		if err := unix.Mount("tmpfs", root, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "mode=0700,size=64m"); err != nil {
			return nil, fmt.Errorf("mounting tmpfs on state directory %s: %w", root, err)
		}
	}
	for _, d := range []string{"volumes", "revocations"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o700); err != nil {
			return nil, fmt.Errorf("state directory: %w", err)
		}
	}
	umask := unix.Umask(0o022)
	unix.Umask(umask)
	return &Filesystem{root: root, opts: opts, mounter: mount.NewWithoutSystemd(""), umask: os.FileMode(umask)}, nil
}

// OpenExisting opens a state directory a driver made, for reading: it
// mounts nothing and creates nothing, and fails where there is no driver
// state (the "leases" command must not cover a mistyped path with a tmpfs).
func OpenExisting(root string) (*Filesystem, error) {
	root = filepath.Clean(root)
	var st unix.Statfs_t
	if err := unix.Statfs(root, &st); err != nil {
		return nil, fmt.Errorf("state directory: %w", err)
	}
	if st.Type != unix.TMPFS_MAGIC {
		return nil, fmt.Errorf("state directory %s is not a driver's tmpfs state", root)
	}
	for _, d := range []string{"volumes", "revocations"} {
		if _, err := os.Stat(filepath.Join(root, d)); err != nil {
			return nil, fmt.Errorf("state directory %s holds no driver state: %w", root, err)
		}
	}
	return &Filesystem{root: root, opts: Options{MaxVolumeBytes: 1 << 20, MaxFiles: 256}, mounter: mount.NewWithoutSystemd("")}, nil
}

// Root is the state directory.
func (f *Filesystem) Root() string { return f.root }

// key names a volume's directory: volume IDs come from kubelet and may hold
// any character, so they never become path components themselves.
func key(volumeID string) string {
	sum := sha256.Sum256([]byte(volumeID))
	return hex.EncodeToString(sum[:16])
}

func (f *Filesystem) volumeDir(id string) string {
	return filepath.Join(f.root, "volumes", key(id))
}

// DataDir is the directory holding the volume's tmpfs (the bind source).
func (f *Filesystem) DataDir(id string) string { return filepath.Join(f.volumeDir(id), "fs") }

// CreateVolume makes the volume's directory and mounts its size-capped tmpfs.
// It is idempotent.
func (f *Filesystem) CreateVolume(id string, gid int) error {
	dir := f.DataDir(id)
	if err := mkdir(f.volumeDir(id)); err != nil {
		return err
	}
	if mounted, err := f.mountPoint(dir, 0o700); err != nil || mounted {
		return err
	}
	mode := "0755"
	if gid > 0 {
		mode = "0750"
	}
	// Every file takes at least a page, and an update briefly holds the old
	// and new sets side by side.
	size := 2*f.opts.MaxVolumeBytes + 2*int64(f.opts.MaxFiles)*4096 + 64<<10
	data := fmt.Sprintf("size=%d,nr_inodes=%d,mode=%s,uid=0,gid=%d", size, 4*f.opts.MaxFiles+16, mode, max(gid, 0))
	if err := unix.Mount("tmpfs", dir, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, data); err != nil {
		return fmt.Errorf("mounting volume tmpfs: %w", err)
	}
	return nil
}

// Mount binds the volume's tmpfs read-only, nosuid, nodev, noexec onto
// target, creating target (but not its parent) if needed. It is idempotent.
func (f *Filesystem) Mount(id, target string) error {
	if mounted, err := f.mountPoint(target, 0o750); err != nil || mounted {
		return err
	}
	return bindReadOnly(f.DataDir(id), target)
}

// mountPoint makes dir, or finds it made already; then, and only then,
// it looks whether something is mounted there (a retried call).
func (f *Filesystem) mountPoint(dir string, mode os.FileMode) (mounted bool, err error) {
	err = os.Mkdir(dir, mode)
	switch {
	case errors.Is(err, os.ErrExist):
		return f.IsMounted(dir), nil
	case err != nil:
		return false, fmt.Errorf("creating mount point: %w", err)
	}
	return false, nil
}

// IsMounted reports whether something is mounted on target.
func (f *Filesystem) IsMounted(target string) bool {
	notMnt, err := f.mounter.IsLikelyNotMountPoint(target)
	return err == nil && !notMnt
}

// UnmountTarget unmounts target and removes the directory. A target that
// is absent or not mounted is fine.
func (f *Filesystem) UnmountTarget(target string) error {
	if err := unmount(target); err != nil {
		return err
	}
	if err := os.Remove(target); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("removing target: %w", err)
	}
	return nil
}

func unmount(path string) error {
	for range 8 { // stacked mounts from repeated binds come off one by one
		err := unix.Unmount(path, unix.UMOUNT_NOFOLLOW)
		switch {
		case err == nil:
			continue
		case errors.Is(err, unix.EINVAL), errors.Is(err, unix.ENOENT):
			return nil // not a mount point (any more), or gone
		case errors.Is(err, unix.EBUSY):
			if err := unix.Unmount(path, unix.MNT_DETACH|unix.UMOUNT_NOFOLLOW); err != nil {
				return fmt.Errorf("unmounting %s: %w", path, err)
			}
		default:
			return fmt.Errorf("unmounting %s: %w", path, err)
		}
	}
	return nil
}

// DeleteVolume unmounts the volume's tmpfs and removes its directory and
// metadata. Deleting an unknown volume is fine.
func (f *Filesystem) DeleteVolume(id string) error {
	if err := unmount(f.DataDir(id)); err != nil {
		return err
	}
	return os.RemoveAll(f.volumeDir(id))
}

// WriteMetadata records m, replacing what was there atomically.
func (f *Filesystem) WriteMetadata(m Metadata) error {
	path := filepath.Join(f.volumeDir(m.VolumeID), "meta.json")
	err := writeJSON(path, m)
	if errors.Is(err, os.ErrNotExist) { // the volume's first record
		if err := mkdir(f.volumeDir(m.VolumeID)); err != nil {
			return err
		}
		err = writeJSON(path, m)
	}
	return err
}

// WriteRecord implements MetadataWriter.
func (f *Filesystem) WriteRecord(name string, v any) error {
	if err := ValidatePath(name); err != nil || strings.Contains(name, "/") {
		return fmt.Errorf("%w: record name %q", ErrInvalidPath, name)
	}
	return writeJSON(filepath.Join(f.root, name+".json"), v)
}

// ReadRecord implements MetadataWriter; a missing record is ErrVolumeNotFound.
func (f *Filesystem) ReadRecord(name string, v any) error {
	if err := ValidatePath(name); err != nil || strings.Contains(name, "/") {
		return fmt.Errorf("%w: record name %q", ErrInvalidPath, name)
	}
	return readJSON(filepath.Join(f.root, name+".json"), v)
}

// ReadMetadata returns the volume's metadata or ErrVolumeNotFound.
func (f *Filesystem) ReadMetadata(id string) (Metadata, error) {
	var m Metadata
	err := readJSON(filepath.Join(f.volumeDir(id), "meta.json"), &m)
	return m, err
}

// leaseFile names the record of lease leaseID in a volume's directory.
func (f *Filesystem) leaseFile(volumeID, leaseID string) string {
	return filepath.Join(f.volumeDir(volumeID), "lease-"+key(leaseID)+".json")
}

// legacyLease is where drivers before keyed lease records kept the one
// lease of a volume; it is still read, so an upgrade loses no handle.
const legacyLease = "lease.json"

// WriteLease records a lease of the volume (secret: tmpfs, mode 0600).
func (f *Filesystem) WriteLease(id string, l provider.Lease) error {
	return writeJSON(f.leaseFile(id, l.ID), l)
}

// ReadLease returns the volume's current lease or ErrVolumeNotFound.
func (f *Filesystem) ReadLease(id string) (provider.Lease, error) {
	m, err := f.ReadMetadata(id)
	if err != nil {
		return provider.Lease{}, err
	}
	if m.LeaseID == "" {
		return provider.Lease{}, ErrVolumeNotFound
	}
	var l provider.Lease
	err = readJSON(f.leaseFile(id, m.LeaseID), &l)
	if errors.Is(err, ErrVolumeNotFound) {
		if err = readJSON(filepath.Join(f.volumeDir(id), legacyLease), &l); err == nil && l.ID != m.LeaseID {
			err = ErrVolumeNotFound
		}
	}
	return l, err
}

// ListLeases returns every lease record of the volume, sorted by ID.
func (f *Filesystem) ListLeases(id string) ([]provider.Lease, error) {
	dir := f.volumeDir(id)
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []provider.Lease
	for _, e := range entries {
		name := e.Name()
		if name != legacyLease && !(strings.HasPrefix(name, "lease-") && strings.HasSuffix(name, ".json")) {
			continue
		}
		var l provider.Lease
		if err := readJSON(filepath.Join(dir, name), &l); err != nil {
			return nil, err
		}
		out = append(out, l)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, nil
}

// DeleteLease removes the record of a lease; removing an absent one is fine.
func (f *Filesystem) DeleteLease(id, leaseID string) error {
	if err := remove(f.leaseFile(id, leaseID)); err != nil {
		return err
	}
	legacy := filepath.Join(f.volumeDir(id), legacyLease)
	var l provider.Lease
	if readJSON(legacy, &l) == nil && l.ID == leaseID {
		return remove(legacy)
	}
	return nil
}

// ListVolumes returns the IDs of every volume with metadata.
func (f *Filesystem) ListVolumes() ([]string, error) {
	entries, err := os.ReadDir(filepath.Join(f.root, "volumes"))
	if err != nil {
		return nil, err
	}
	var ids []string
	for _, e := range entries {
		var m Metadata
		if err := readJSON(filepath.Join(f.root, "volumes", e.Name(), "meta.json"), &m); err != nil {
			continue // a directory whose metadata never got written: see Orphans
		}
		ids = append(ids, m.VolumeID)
	}
	sort.Strings(ids)
	return ids, nil
}

// RemoveOrphans removes volume directories that have no metadata (a crash
// between creating the directory and recording the volume; no lease was
// issued for them) and returns how many it removed.
func (f *Filesystem) RemoveOrphans() (int, error) {
	entries, err := os.ReadDir(filepath.Join(f.root, "volumes"))
	if err != nil {
		return 0, err
	}
	n := 0
	for _, e := range entries {
		dir := filepath.Join(f.root, "volumes", e.Name())
		if _, err := os.Stat(filepath.Join(dir, "meta.json")); err == nil {
			continue
		}
		if err := unmount(filepath.Join(dir, "fs")); err != nil {
			return n, err
		}
		if err := os.RemoveAll(dir); err != nil {
			return n, err
		}
		n++
	}
	return n, nil
}

func revocationPath(root, leaseID string) string {
	return filepath.Join(root, "revocations", key(leaseID)+".json")
}

// PutRevocation adds or updates an entry of the revocation queue.
func (f *Filesystem) PutRevocation(r Revocation) error {
	return writeJSON(revocationPath(f.root, r.Lease.ID), r)
}

// DeleteRevocation removes an entry; removing an absent one is fine.
func (f *Filesystem) DeleteRevocation(leaseID string) error {
	return remove(revocationPath(f.root, leaseID))
}

// remove removes a file; an absent one is fine.
func remove(path string) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// ListRevocations returns the queue, oldest first.
func (f *Filesystem) ListRevocations() ([]Revocation, error) {
	entries, err := os.ReadDir(filepath.Join(f.root, "revocations"))
	if err != nil {
		return nil, err
	}
	var out []Revocation
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), ".json") {
			continue
		}
		var r Revocation
		if err := readJSON(filepath.Join(f.root, "revocations", e.Name()), &r); err != nil {
			return nil, err
		}
		out = append(out, r)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].EnqueuedAt.Before(out[j].EnqueuedAt) })
	return out, nil
}

// mkdir makes a directory of the driver's own (0700) unless it exists.
func mkdir(dir string) error {
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return err
	}
	return nil
}

// writeJSON replaces path with v atomically (write a temporary file,
// rename it). It uses the system calls directly: os.File would try to
// register a regular file with the poller on every open.
func writeJSON(path string, v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	fd, err := unix.Open(tmp, unix.O_WRONLY|unix.O_CREAT|unix.O_TRUNC|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0o600)
	if err != nil {
		return &os.PathError{Op: "open", Path: tmp, Err: err}
	}
	err = writeAll(fd, data)
	if cerr := unix.Close(fd); err == nil {
		err = cerr
	}
	if err != nil {
		return &os.PathError{Op: "write", Path: tmp, Err: err}
	}
	return os.Rename(tmp, path)
}

func readJSON(path string, v any) error {
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return ErrVolumeNotFound
	}
	if err != nil {
		return err
	}
	return json.Unmarshal(data, v)
}
