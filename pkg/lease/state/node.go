package state

import (
	"errors"
	"fmt"
	"regexp"
	"sync"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// ErrInvalidTask: a task ID that cannot name a task's record and files.
var ErrInvalidTask = errors.New("a task ID is 1 to 63 characters of a-z, 0-9 and -, starting and ending with a letter or digit")

// taskID is the form of a task ID; its length is checked apart (a bounded
// repetition would compile to 61 copies of the class, 44 kB of every
// process's heap from start-up).
var taskID = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]*[a-z0-9])?$`)

// ValidTask reports whether id is a valid task ID.
func ValidTask(id string) error {
	if len(id) > 63 || !taskID.MatchString(id) {
		return fmt.Errorf("%w: %q", ErrInvalidTask, id)
	}
	return nil
}

// seenRecord names the node's record of which identities asked for what.
const seenRecord = "seen"

// NodeRecords keeps the node's own small records (not a volume's): what
// Seen needs of the store.
type NodeRecords interface {
	WriteRecord(name string, v any) error
	ReadRecord(name string, v any) error
}

// Seen is when each namespace, service account and class first asked for
// a volume on the node, kept as a node record. Its lock is held to check
// and write that record only, so that the writes land in order; nothing
// is locked under it. The zero value is ready to use.
type Seen struct {
	mu sync.Mutex
	at map[string]time.Time // "namespace/serviceaccount/class" -> first request
}

// Load reads the record, if there is one.
func (s *Seen) Load(r NodeRecords) {
	at := map[string]time.Time{}
	if err := r.ReadRecord(seenRecord, &at); err == nil {
		s.mu.Lock()
		s.at = at
		s.mu.Unlock()
	}
}

// First reports whether this is the first request on the node from the
// pod's namespace and service account for class, and records it at now;
// the error is the record's write's (the request is the first regardless).
func (s *Seen) First(w NodeRecords, pod provider.Pod, class string, now time.Time) (bool, error) {
	key := pod.Namespace + "/" + pod.ServiceAccount + "/" + class
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.at[key]; ok {
		return false, nil
	}
	if s.at == nil {
		s.at = map[string]time.Time{}
	}
	s.at[key] = now
	return true, w.WriteRecord(seenRecord, s.at)
}
