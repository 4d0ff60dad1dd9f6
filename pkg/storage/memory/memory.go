// Package memory is a volume store held in memory: the records, the
// volumes' files and the mounts of pkg/storage's Filesystem, kept in maps
// instead of on tmpfs, so that the lease manager runs without root (its
// unprivileged test tier). It keeps to the Filesystem's contract (one
// contract test runs against both, pkg/storage's contract_test.go):
// records are JSON it never interprets, written whole or not at all; a
// volume's files are replaced as one set; a target shows the files of the
// volume mounted on it until it is unmounted, even after the volume is
// deleted, as a bind mount does.
//
// Nothing of a real node is touched: a target is a name, not a directory,
// and a file's mode and group are kept but enforce nothing. The driver's
// binary never links it (test/layering checks that).
//
// It imports pkg/storage (the contract, its errors and limits) and
// pkg/volumepath only.
package memory

import (
	"encoding/json"
	"fmt"
	"io/fs"
	"maps"
	"slices"
	"strings"
	"sync"

	"github.com/ephemeral-secrets/csi-driver/pkg/storage"
	"github.com/ephemeral-secrets/csi-driver/pkg/volumepath"
)

// Store is a volume store in memory. The zero value is not usable: call New.
type Store struct {
	opts storage.Options

	mu          sync.Mutex
	records     map[string][]byte   // the node's named records
	volumes     map[string]*volume  // by volume ID
	revocations map[string][]byte   // by lease ID
	mounts      map[string]*fileSet // target -> what it shows
}

// volume is what a volume's directory holds on a Filesystem.
type volume struct {
	meta   []byte            // nil: no metadata recorded
	leases map[string][]byte // by lease ID
	legacy []byte            // the record drivers before keyed leases kept
	data   *fileSet          // nil until CreateVolume: its tmpfs
}

// fileSet is a volume's tmpfs: the set its last WriteFiles wrote.
type fileSet struct {
	gid   int
	files map[string]storage.File // by path
}

var (
	_ storage.RecordStore = (*Store)(nil)
	_ storage.DataWriter  = (*Store)(nil)
)

// New returns an empty store with the Filesystem's defaults for what
// opts leaves zero.
func New(opts storage.Options) *Store {
	if opts.MaxVolumeBytes <= 0 {
		opts.MaxVolumeBytes = 1 << 20
	}
	if opts.MaxFiles <= 0 {
		opts.MaxFiles = 256
	}
	return &Store{
		opts: opts, records: map[string][]byte{}, volumes: map[string]*volume{},
		revocations: map[string][]byte{}, mounts: map[string]*fileSet{},
	}
}

// put encodes v, then hands it to set under s.mu; set may refuse.
func (s *Store) put(v any, set func(data []byte) error) error {
	data, err := json.Marshal(v)
	if err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return set(data)
}

// get decodes into v the record find returns under s.mu; none is
// ErrVolumeNotFound.
func (s *Store) get(v any, find func() []byte) error {
	s.mu.Lock()
	data := find()
	s.mu.Unlock()
	if data == nil {
		return storage.ErrVolumeNotFound
	}
	return json.Unmarshal(data, v)
}

// ofVolume finds a record of volume id with f, if the volume exists;
// under s.mu.
func (s *Store) ofVolume(id string, f func(*volume) []byte) func() []byte {
	return func() []byte {
		if vol := s.volumes[id]; vol != nil {
			return f(vol)
		}
		return nil
	}
}

// inVolume sets a record of volume id with f, if the volume's directory
// exists (the Filesystem writes only into one that does); under s.mu.
func (s *Store) inVolume(id, what string, f func(*volume, []byte)) func([]byte) error {
	return func(data []byte) error {
		vol := s.volumes[id]
		if vol == nil {
			return &fs.PathError{Op: "write", Path: "volumes/" + id + "/" + what, Err: fs.ErrNotExist}
		}
		f(vol, data)
		return nil
	}
}

func checkRecordName(name string) error {
	if err := volumepath.Check(name); err != nil || strings.Contains(name, "/") {
		return fmt.Errorf("%w: record name %q", storage.ErrInvalidPath, name)
	}
	return nil
}

// WriteRecord implements storage.RecordStore.
func (s *Store) WriteRecord(name string, v any) error {
	if err := checkRecordName(name); err != nil {
		return err
	}
	return s.put(v, func(data []byte) error { s.records[name] = data; return nil })
}

// ReadRecord implements storage.RecordStore.
func (s *Store) ReadRecord(name string, v any) error {
	if err := checkRecordName(name); err != nil {
		return err
	}
	return s.get(v, func() []byte { return s.records[name] })
}

// dir returns the volume's directory, made if absent (as WriteMetadata
// and CreateVolume make it); under s.mu.
func (s *Store) dir(id string) *volume {
	v := s.volumes[id]
	if v == nil {
		v = &volume{leases: map[string][]byte{}}
		s.volumes[id] = v
	}
	return v
}

// WriteMetadata implements storage.RecordStore; it makes the volume's
// directory if needed.
func (s *Store) WriteMetadata(id string, v any) error {
	return s.put(v, func(data []byte) error { s.dir(id).meta = data; return nil })
}

// ReadMetadata implements storage.RecordStore.
func (s *Store) ReadMetadata(id string, v any) error {
	return s.get(v, s.ofVolume(id, func(vol *volume) []byte { return vol.meta }))
}

// ListMetadata implements storage.RecordStore, in no set order.
func (s *Store) ListMetadata() ([]json.RawMessage, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []json.RawMessage
	for _, v := range s.volumes {
		if v.meta != nil {
			out = append(out, v.meta)
		}
	}
	return out, nil
}

// WriteLease implements storage.RecordStore. Like the Filesystem, it
// writes only into a volume's directory that exists (made by CreateVolume
// or WriteMetadata).
func (s *Store) WriteLease(id, leaseID string, v any) error {
	return s.put(v, s.inVolume(id, "lease", func(vol *volume, data []byte) { vol.leases[leaseID] = data }))
}

// ReadLease implements storage.RecordStore.
func (s *Store) ReadLease(id, leaseID string, v any) error {
	return s.get(v, s.ofVolume(id, func(vol *volume) []byte { return vol.leases[leaseID] }))
}

// ReadLegacyLease implements storage.RecordStore.
func (s *Store) ReadLegacyLease(id string, v any) error {
	return s.get(v, s.ofVolume(id, func(vol *volume) []byte { return vol.legacy }))
}

// WriteLegacyLease records v as the volume's legacy lease record, as a
// driver before keyed lease records wrote it: for tests of an upgrade.
func (s *Store) WriteLegacyLease(id string, v any) error {
	return s.put(v, s.inVolume(id, "lease.json", func(vol *volume, data []byte) { vol.legacy = data }))
}

// DeleteLegacyLease implements storage.RecordStore.
func (s *Store) DeleteLegacyLease(id string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if vol := s.volumes[id]; vol != nil {
		vol.legacy = nil
	}
	return nil
}

// ListLeases implements storage.RecordStore: the keyed records by lease
// ID, then the legacy one.
func (s *Store) ListLeases(id string) ([]json.RawMessage, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	vol := s.volumes[id]
	if vol == nil {
		return nil, nil
	}
	var out []json.RawMessage
	for _, k := range slices.Sorted(maps.Keys(vol.leases)) {
		out = append(out, vol.leases[k])
	}
	if vol.legacy != nil {
		out = append(out, vol.legacy)
	}
	return out, nil
}

// DeleteLease implements storage.RecordStore.
func (s *Store) DeleteLease(id, leaseID string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if vol := s.volumes[id]; vol != nil {
		delete(vol.leases, leaseID)
	}
	return nil
}

// PutRevocation implements storage.RecordStore.
func (s *Store) PutRevocation(leaseID string, v any) error {
	return s.put(v, func(data []byte) error { s.revocations[leaseID] = data; return nil })
}

// DeleteRevocation implements storage.RecordStore.
func (s *Store) DeleteRevocation(leaseID string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.revocations, leaseID)
	return nil
}

// ListRevocations implements storage.RecordStore, in no set order.
func (s *Store) ListRevocations() ([]json.RawMessage, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]json.RawMessage, 0, len(s.revocations))
	for _, data := range s.revocations {
		out = append(out, data)
	}
	return out, nil
}

// RemoveOrphans removes the volumes that have no metadata (with their
// files and lease records, as the Filesystem removes their directories)
// and returns how many it removed.
func (s *Store) RemoveOrphans() (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for id, v := range s.volumes {
		if v.meta == nil {
			delete(s.volumes, id)
			n++
		}
	}
	return n, nil
}

// CreateVolume implements storage.DataWriter; it is idempotent.
func (s *Store) CreateVolume(id string, gid int) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if vol := s.dir(id); vol.data == nil {
		vol.data = &fileSet{gid: max(gid, 0), files: map[string]storage.File{}}
	}
	return nil
}

// WriteFiles implements storage.DataWriter: it checks files as the
// Filesystem does (the caps, each path, the lease socket's name), then
// replaces the volume's set at once.
func (s *Store) WriteFiles(id string, gid int, files []storage.File) error {
	if len(files) > s.opts.MaxFiles {
		return fmt.Errorf("%w: %d files, at most %d", storage.ErrTooLarge, len(files), s.opts.MaxFiles)
	}
	var total int64
	set := make(map[string]storage.File, len(files))
	for _, f := range files {
		if err := volumepath.Check(f.Path); err != nil {
			return err
		}
		if strings.SplitN(f.Path, "/", 2)[0] == storage.SocketName {
			return fmt.Errorf("%w: %q is the volume's lease socket", storage.ErrInvalidPath, f.Path)
		}
		total += int64(len(f.Data))
		f.Data = slices.Clone(f.Data)
		set[f.Path] = f
	}
	if total > s.opts.MaxVolumeBytes {
		return fmt.Errorf("%w: %d bytes, at most %d", storage.ErrTooLarge, total, s.opts.MaxVolumeBytes)
	}
	for p := range set {
		for d := p; strings.Contains(d, "/"); {
			d = d[:strings.LastIndex(d, "/")]
			if _, ok := set[d]; ok {
				return fmt.Errorf("writing %s: %s is a file, not a directory", p, d)
			}
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	vol := s.volumes[id]
	if vol == nil || vol.data == nil {
		return fmt.Errorf("writing the files of volume %s: %w", id, storage.ErrVolumeNotFound)
	}
	vol.data.gid, vol.data.files = max(gid, 0), set
	return nil
}

// Mount implements storage.DataWriter: target shows the volume's files
// until UnmountTarget. It is idempotent.
func (s *Store) Mount(id, target string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.mounts[target]; ok {
		return nil
	}
	vol := s.volumes[id]
	if vol == nil || vol.data == nil {
		return fmt.Errorf("bind-mounting volume %s: %w", id, storage.ErrVolumeNotFound)
	}
	s.mounts[target] = vol.data
	return nil
}

// IsMounted implements storage.DataWriter.
func (s *Store) IsMounted(target string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ok := s.mounts[target]
	return ok
}

// UnmountTarget implements storage.DataWriter; an absent target is fine.
func (s *Store) UnmountTarget(target string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.mounts, target)
	return nil
}

// DeleteVolume implements storage.DataWriter: the volume's files and
// records go; a target it is still mounted on keeps showing its files.
func (s *Store) DeleteVolume(id string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.volumes, id)
	return nil
}

// ErrNotMounted: nothing is mounted on the target read.
var ErrNotMounted = fmt.Errorf("nothing mounted: %w", fs.ErrNotExist)

// mounted returns the set mounted on target, or ErrNotMounted.
func (s *Store) mounted(target string) (*fileSet, error) {
	set, ok := s.mounts[target]
	if !ok {
		return nil, fmt.Errorf("%s: %w", target, ErrNotMounted)
	}
	return set, nil
}

// ReadFile returns the file at path (slash-separated, relative) of what
// is mounted on target, as a pod reads it; fs.ErrNotExist if there is no
// such file or nothing is mounted.
func (s *Store) ReadFile(target, path string) ([]byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	set, err := s.mounted(target)
	if err != nil {
		return nil, err
	}
	f, ok := set.files[path]
	if !ok {
		return nil, &fs.PathError{Op: "open", Path: path, Err: fs.ErrNotExist}
	}
	return slices.Clone(f.Data), nil
}

// ReadDir returns the sorted names of the entries in directory dir ("."
// for the root) of what is mounted on target, as a pod lists them.
func (s *Store) ReadDir(target, dir string) ([]string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	set, err := s.mounted(target)
	if err != nil {
		return nil, err
	}
	prefix := ""
	if dir != "." && dir != "" {
		prefix = strings.TrimSuffix(dir, "/") + "/"
	}
	names := map[string]bool{}
	for p := range set.files {
		if rest, ok := strings.CutPrefix(p, prefix); ok {
			names[strings.SplitN(rest, "/", 2)[0]] = true
		}
	}
	if len(names) == 0 && prefix != "" {
		return nil, &fs.PathError{Op: "open", Path: dir, Err: fs.ErrNotExist}
	}
	return slices.Sorted(maps.Keys(names)), nil
}
