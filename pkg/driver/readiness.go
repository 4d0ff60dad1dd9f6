package driver

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
)

// Readiness is the readiness probe's condition of a driver on its node.
//
// The instance that holds the node lock is ready once its CSI socket
// answers Probe with ready (recovery has finished) and, where the driver
// registers itself, kubelet has confirmed the registration: only then
// can kubelet call it.
//
// An instance waiting for the node lock (a DaemonSet's surge pod) is ready
// while the holder serves the node: the socket answers Probe with ready. A
// surge rollout deletes the old pod only once the new one is ready, so a
// standby that said "not ready" until it held the lock would wait forever
// for a lock the old pod never gives up. It never touches the socket, the
// registration or the state while it waits.
type Readiness struct {
	// Endpoint is the CSI socket (unix:///path) as this process sees it.
	Endpoint string
	// Registered tells whether kubelet confirmed the driver's
	// registration; nil: the driver does not register itself (a
	// node-driver-registrar sidecar does).
	Registered func() bool

	held atomic.Bool
}

// Held records that this instance holds the node lock: from now on the
// socket is its own.
func (r *Readiness) Held() { r.held.Store(true) }

// Check is nil when the driver is ready.
func (r *Readiness) Check(ctx context.Context) error {
	held := r.held.Load()
	if err := ProbeEndpoint(ctx, r.Endpoint); err != nil {
		if !held {
			return fmt.Errorf("standby (waiting for the node lock), and its holder does not serve the node: %w", err)
		}
		return err
	}
	if held && r.Registered != nil && !r.Registered() {
		return errors.New("kubelet has not registered the driver (no NotifyRegistrationStatus yet)")
	}
	return nil
}
