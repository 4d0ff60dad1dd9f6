package lease

import "github.com/ephemeral-secrets/csi-driver/pkg/lease/state"

// The lease state machine's records, defined in pkg/lease/state (their
// JSON is the on-disk format of a live node's state), and what a pod may
// know of them.
type (
	// State of a volume's lease, recorded before each step.
	State = state.State
	// Metadata is what the driver records about a volume: nothing secret.
	Metadata = state.Metadata
	// Task is the record of one task lease of a volume: nothing secret.
	Task = state.Task
	// Info is what a pod may know of its volume's lease: nothing secret.
	Info = state.Info
	// TaskInfo is one task lease, as its pod sees it: nothing secret.
	TaskInfo = state.TaskInfo
)

// The states of a volume's lease (see pkg/lease/state).
const (
	StateIssuing   = state.Issuing
	StatePublished = state.Published
	StateWithdrawn = state.Withdrawn
)
