// Package storage is the volume store on tmpfs: a size-capped tmpfs per
// volume bind-mounted read-only onto the pod's target path, atomic updates
// of its files through a "..data" symlink, and the driver's durable
// records (each volume's metadata and lease records, the revocation
// queue, the node's own records) in its own tmpfs state directory, which
// survives a driver restart but not a reboot. It also holds kubelet's
// target path policy.
//
// It keeps records as JSON it never interprets: their shape is their
// owners' (pkg/lease, pkg/lease/revocation). It sits at the bottom of the
// node's stack and imports pkg/volumepath only: nothing of providers,
// leases or the driver.
package storage

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
	mount "k8s.io/mount-utils"

	"github.com/ephemeral-secrets/csi-driver/pkg/volumepath"
)

// Errors callers map to CSI codes.
var (
	ErrTooLarge       = errors.New("volume contents exceed the size cap")
	ErrVolumeNotFound = errors.New("volume not found")
)

// File is one file of a volume.
type File struct {
	Path string
	Mode os.FileMode
	Data []byte
}

// RecordStore keeps the driver's records: small JSON documents it writes
// atomically and never interprets. Each volume has one metadata record and
// any number of lease records keyed by lease ID; the node has a revocation
// queue keyed by lease ID and named records of its own. The shape of every
// record is its owner's (pkg/lease, pkg/lease/revocation): this package
// only encodes what it is given and decodes into what it is given.
type RecordStore interface {
	// WriteRecord and ReadRecord keep a small named record of the node's
	// own (not a volume's), such as which identities asked for what.
	WriteRecord(name string, v any) error
	ReadRecord(name string, v any) error
	// WriteMetadata records v as the volume's metadata, replacing what was
	// there; ReadMetadata decodes it into v (ErrVolumeNotFound if absent).
	WriteMetadata(volumeID string, v any) error
	ReadMetadata(volumeID string, v any) error
	// ListMetadata returns the metadata record of every volume.
	ListMetadata() ([]json.RawMessage, error)
	// WriteLease records v as lease leaseID of the volume: the records of
	// other leases of the volume stay until DeleteLease.
	WriteLease(volumeID, leaseID string, v any) error
	ReadLease(volumeID, leaseID string, v any) error
	// ReadLegacyLease reads the one lease record drivers kept per volume
	// before lease records were keyed (ErrVolumeNotFound if absent);
	// DeleteLegacyLease removes it.
	ReadLegacyLease(volumeID string, v any) error
	DeleteLegacyLease(volumeID string) error
	// ListLeases returns every lease record of the volume, the legacy one
	// included.
	ListLeases(volumeID string) ([]json.RawMessage, error)
	DeleteLease(volumeID, leaseID string) error
	// PutRevocation records v as the queued revocation of leaseID;
	// ListRevocations returns every one queued.
	PutRevocation(leaseID string, v any) error
	DeleteRevocation(leaseID string) error
	ListRevocations() ([]json.RawMessage, error)
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
	_ RecordStore = (*Filesystem)(nil)
	_ DataWriter  = (*Filesystem)(nil)
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

// WriteMetadata records v as the volume's metadata, replacing what was
// there atomically.
func (f *Filesystem) WriteMetadata(id string, v any) error {
	path := filepath.Join(f.volumeDir(id), "meta.json")
	err := writeJSON(path, v)
	if errors.Is(err, os.ErrNotExist) { // the volume's first record
		if err := mkdir(f.volumeDir(id)); err != nil {
			return err
		}
		err = writeJSON(path, v)
	}
	return err
}

// WriteRecord implements RecordStore.
func (f *Filesystem) WriteRecord(name string, v any) error {
	if err := volumepath.Check(name); err != nil || strings.Contains(name, "/") {
		return fmt.Errorf("%w: record name %q", ErrInvalidPath, name)
	}
	return writeJSON(filepath.Join(f.root, name+".json"), v)
}

// ReadRecord implements RecordStore; a missing record is ErrVolumeNotFound.
func (f *Filesystem) ReadRecord(name string, v any) error {
	if err := volumepath.Check(name); err != nil || strings.Contains(name, "/") {
		return fmt.Errorf("%w: record name %q", ErrInvalidPath, name)
	}
	return readJSON(filepath.Join(f.root, name+".json"), v)
}

// ReadMetadata decodes the volume's metadata into v, or returns
// ErrVolumeNotFound.
func (f *Filesystem) ReadMetadata(id string, v any) error {
	return readJSON(filepath.Join(f.volumeDir(id), "meta.json"), v)
}

// leaseFile names the record of lease leaseID in a volume's directory.
func (f *Filesystem) leaseFile(volumeID, leaseID string) string {
	return filepath.Join(f.volumeDir(volumeID), "lease-"+key(leaseID)+".json")
}

// legacyLease is where drivers before keyed lease records kept the one
// lease of a volume; it is still read, so an upgrade loses no handle.
const legacyLease = "lease.json"

// WriteLease records a lease of the volume (secret: tmpfs, mode 0600).
func (f *Filesystem) WriteLease(id, leaseID string, v any) error {
	return writeJSON(f.leaseFile(id, leaseID), v)
}

// ReadLease decodes the record of lease leaseID of the volume into v, or
// returns ErrVolumeNotFound.
func (f *Filesystem) ReadLease(id, leaseID string, v any) error {
	return readJSON(f.leaseFile(id, leaseID), v)
}

// ReadLegacyLease decodes the volume's legacy lease record into v, or
// returns ErrVolumeNotFound.
func (f *Filesystem) ReadLegacyLease(id string, v any) error {
	return readJSON(filepath.Join(f.volumeDir(id), legacyLease), v)
}

// DeleteLegacyLease removes the volume's legacy lease record; removing an
// absent one is fine.
func (f *Filesystem) DeleteLegacyLease(id string) error {
	return remove(filepath.Join(f.volumeDir(id), legacyLease))
}

// ListLeases returns every lease record of the volume, in the order of
// their file names.
func (f *Filesystem) ListLeases(id string) ([]json.RawMessage, error) {
	dir := f.volumeDir(id)
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []json.RawMessage
	for _, e := range entries {
		name := e.Name()
		if name != legacyLease && !(strings.HasPrefix(name, "lease-") && strings.HasSuffix(name, ".json")) {
			continue
		}
		data, err := readRaw(filepath.Join(dir, name))
		if err != nil {
			return nil, err
		}
		out = append(out, data)
	}
	return out, nil
}

// DeleteLease removes the record of a lease; removing an absent one is fine.
func (f *Filesystem) DeleteLease(id, leaseID string) error {
	return remove(f.leaseFile(id, leaseID))
}

// ListMetadata returns the metadata record of every volume that has one.
func (f *Filesystem) ListMetadata() ([]json.RawMessage, error) {
	entries, err := os.ReadDir(filepath.Join(f.root, "volumes"))
	if err != nil {
		return nil, err
	}
	var out []json.RawMessage
	for _, e := range entries {
		data, err := readRaw(filepath.Join(f.root, "volumes", e.Name(), "meta.json"))
		if err != nil {
			continue // a directory whose metadata never got written: see RemoveOrphans
		}
		out = append(out, data)
	}
	return out, nil
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

// PutRevocation adds or updates the queued revocation of leaseID.
func (f *Filesystem) PutRevocation(leaseID string, v any) error {
	return writeJSON(revocationPath(f.root, leaseID), v)
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

// ListRevocations returns every queued revocation, in no set order.
func (f *Filesystem) ListRevocations() ([]json.RawMessage, error) {
	entries, err := os.ReadDir(filepath.Join(f.root, "revocations"))
	if err != nil {
		return nil, err
	}
	var out []json.RawMessage
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), ".json") {
			continue
		}
		data, err := readRaw(filepath.Join(f.root, "revocations", e.Name()))
		if err != nil {
			return nil, err
		}
		out = append(out, data)
	}
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
	data, err := readRaw(path)
	if err != nil {
		return err
	}
	return json.Unmarshal(data, v)
}

// readRaw returns a record's bytes, or ErrVolumeNotFound if it is absent.
func readRaw(path string) (json.RawMessage, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, ErrVolumeNotFound
	}
	return data, err
}
