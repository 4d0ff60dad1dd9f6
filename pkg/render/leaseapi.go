package render

import (
	"fmt"
	"maps"
	"path"
	"slices"
	"strconv"
	"strings"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/storage"
)

// Class parameters of the lease socket.
const (
	// LeaseAPIParam "true" gives the volume a lease socket.
	LeaseAPIParam = "leaseAPI"
	// MaxTasksParam bounds the live task leases of one volume.
	MaxTasksParam = "maxTasks"
)

// DefaultMaxTasks is a volume's task cap when its class names none;
// DefaultMaxTasksCap is the admin's cap over every class by default.
const (
	DefaultMaxTasks    = 4
	DefaultMaxTasksCap = 16
)

// TasksDir is the directory of a volume that holds its tasks' files,
// each task's under TasksDir/<task>/.
const TasksDir = "tasks"

func (s *Spec) parseLeaseAPI(params map[string]string) error {
	switch v := params[LeaseAPIParam]; v {
	case "", "false":
	case "true":
		s.LeaseAPI = true
	default:
		return fmt.Errorf("%w: %s must be \"true\" or \"false\", not %q", ErrInvalidSpec, LeaseAPIParam, v)
	}
	s.MaxTasks = DefaultMaxTasks
	if v, ok := params[MaxTasksParam]; ok {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			return fmt.Errorf("%w: %s %q is not a count", ErrInvalidSpec, MaxTasksParam, v)
		}
		if !s.LeaseAPI {
			return fmt.Errorf("%w: %s needs %s: \"true\"", ErrInvalidSpec, MaxTasksParam, LeaseAPIParam)
		}
		s.MaxTasks = n
	}
	if s.MaxTasks > s.limits.MaxTasks {
		if _, asked := params[MaxTasksParam]; asked {
			return fmt.Errorf("%w: %s %d is above the admin's cap of %d", ErrInvalidSpec, MaxTasksParam, s.MaxTasks, s.limits.MaxTasks)
		}
		s.MaxTasks = s.limits.MaxTasks
	}
	return nil
}

// RenderVolume renders a volume's files: those of its own lease (none
// when main has no ID: a withdrawn volume), then each task's, under
// TasksDir/<task>/. With the lease socket, no file of the volume's own
// may take the name TasksDir.
func (s *Spec) RenderVolume(main provider.Lease, tasks map[string]provider.Lease) ([]storage.File, error) {
	var out []storage.File
	if main.ID != "" {
		files, err := s.Render(main)
		if err != nil {
			return nil, err
		}
		for _, f := range files {
			if s.LeaseAPI && strings.SplitN(f.Path, "/", 2)[0] == TasksDir {
				return nil, fmt.Errorf("%w: %q: %s/ holds the task leases' files", ErrInvalidSpec, f.Path, TasksDir)
			}
		}
		out = files
	}
	for _, id := range slices.Sorted(maps.Keys(tasks)) {
		files, err := s.Render(tasks[id])
		if err != nil {
			return nil, fmt.Errorf("task %s: %w", id, err)
		}
		for _, f := range files {
			f.Path = path.Join(TasksDir, id, f.Path)
			out = append(out, f)
		}
	}
	return out, nil
}
