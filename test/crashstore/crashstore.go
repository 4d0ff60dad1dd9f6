// Package crashstore wraps a volume store so that a test can stop the
// lease manager right after its Nth durable write, as a crash would: the
// wrapper panics with Crashed once the write went through, so no more of
// the manager's code runs and the store stays exactly as written. It
// imports nothing of the lease manager, so the manager's own tests use it.
package crashstore

import (
	"sync"

	"github.com/ephemeral-secrets/csi-driver/pkg/storage"
)

// Inner is the store being wrapped: the raw volume store the lease
// manager's Store is made of (lease.NewStore(crashstore.New(raw)), raw a
// *storage.Filesystem in the privileged test tier, a *memory.Store in the
// unprivileged one), so every durable write of a record is one write
// here.
type Inner interface {
	storage.RecordStore
	storage.DataWriter
	RemoveOrphans() (int, error)
}

// Crashed is what Store panics with; After names the last write.
type Crashed struct{ After string }

// Store passes every call to Inner and counts the writes that succeed;
// once armed with a limit, it panics right after that many. Reads are
// never counted.
type Store struct {
	Inner
	mu     sync.Mutex
	limit  int // 0: never stop
	writes []string
}

// New wraps inner, unarmed.
func New(inner Inner) *Store { return &Store{Inner: inner} }

// Arm starts counting writes afresh and stops after limit of them (0:
// never).
func (s *Store) Arm(limit int) {
	s.mu.Lock()
	s.limit, s.writes = limit, nil
	s.mu.Unlock()
}

// Writes are the names of the writes counted since Arm.
func (s *Store) Writes() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.writes...)
}

// Run calls op and reports the write after which it stopped, or "" if it
// returned.
func Run(op func()) (after string) {
	defer func() {
		if r := recover(); r != nil {
			c, ok := r.(Crashed)
			if !ok {
				panic(r)
			}
			after = c.After
		}
	}()
	op()
	return ""
}

func (s *Store) wrote(name string, err error) error {
	if err != nil {
		return err
	}
	s.mu.Lock()
	s.writes = append(s.writes, name)
	stop := s.limit > 0 && len(s.writes) == s.limit
	s.mu.Unlock()
	if stop {
		panic(Crashed{After: name})
	}
	return nil
}

func (s *Store) WriteRecord(name string, v any) error {
	return s.wrote("WriteRecord", s.Inner.WriteRecord(name, v))
}
func (s *Store) WriteMetadata(id string, v any) error {
	return s.wrote("WriteMetadata", s.Inner.WriteMetadata(id, v))
}
func (s *Store) WriteLease(id, leaseID string, v any) error {
	return s.wrote("WriteLease", s.Inner.WriteLease(id, leaseID, v))
}
func (s *Store) DeleteLease(id, leaseID string) error {
	return s.wrote("DeleteLease", s.Inner.DeleteLease(id, leaseID))
}
func (s *Store) DeleteLegacyLease(id string) error {
	return s.wrote("DeleteLegacyLease", s.Inner.DeleteLegacyLease(id))
}
func (s *Store) PutRevocation(leaseID string, v any) error {
	return s.wrote("PutRevocation", s.Inner.PutRevocation(leaseID, v))
}
func (s *Store) DeleteRevocation(id string) error {
	return s.wrote("DeleteRevocation", s.Inner.DeleteRevocation(id))
}
func (s *Store) CreateVolume(id string, gid int) error {
	return s.wrote("CreateVolume", s.Inner.CreateVolume(id, gid))
}
func (s *Store) WriteFiles(id string, gid int, files []storage.File) error {
	return s.wrote("WriteFiles", s.Inner.WriteFiles(id, gid, files))
}
func (s *Store) Mount(id, target string) error {
	return s.wrote("Mount", s.Inner.Mount(id, target))
}
func (s *Store) UnmountTarget(target string) error {
	return s.wrote("UnmountTarget", s.Inner.UnmountTarget(target))
}
func (s *Store) DeleteVolume(id string) error {
	return s.wrote("DeleteVolume", s.Inner.DeleteVolume(id))
}
func (s *Store) RemoveOrphans() (int, error) {
	n, err := s.Inner.RemoveOrphans()
	return n, s.wrote("RemoveOrphans", err)
}
