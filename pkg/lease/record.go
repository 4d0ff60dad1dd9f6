package lease

import "github.com/ephemeral-secrets/csi-driver/pkg/lease/state"

// The lease state machine's records, defined in pkg/lease/state: their
// JSON is the on-disk format of a live node's state.
type (
	// State of a volume's lease, recorded before each step.
	State = state.State
	// Metadata is what the driver records about a volume: nothing secret.
	Metadata = state.Metadata
	// Task is the record of one task lease of a volume: nothing secret.
	Task = state.Task
)

// The states of a volume's lease (see pkg/lease/state).
const (
	StateIssuing   = state.Issuing
	StatePublished = state.Published
	StateWithdrawn = state.Withdrawn
)
