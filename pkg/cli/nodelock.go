package cli

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"time"

	"k8s.io/klog/v2"

	"github.com/ephemeral-secrets/csi-driver/pkg/driver"
	"github.com/ephemeral-secrets/csi-driver/pkg/metrics"
	"github.com/ephemeral-secrets/csi-driver/pkg/registration"
)

// heldNode is what serve holds once it is the node's one driver: the node
// lock, the registrar (nil: no registration of our own) and the health
// server.
type heldNode struct {
	lock   *driver.NodeLock
	reg    *registration.Registrar
	health *http.Server
}

// holdNode serves health and metrics at once, then waits for the node lock
// while another instance serves the node (live; ready while that instance
// answers). It returns nil with no error if ctx ends while it waits.
func holdNode(ctx context.Context, f *serveFlags, m *metrics.Metrics) (*heldNode, error) {
	n := &heldNode{}
	if f.registrationDir != "" {
		if f.registrationPath == "" {
			f.registrationPath = filepath.Join(f.kubeletDir, "plugins", driver.Name, "csi.sock")
		}
		n.reg = registration.New(registration.Options{DriverName: driver.Name, Dir: f.registrationDir, Endpoint: f.registrationPath})
	}
	ready := &driver.Readiness{Endpoint: f.endpoint}
	h := metrics.Health{Ready: ready.Check}
	if n.reg != nil {
		ready.Registered = n.reg.Registered
		h.Live = func(context.Context) error { return n.reg.Healthy() }
	}
	if f.metricsAddr != "" {
		ml, err := net.Listen("tcp", f.metricsAddr)
		if err != nil {
			return nil, fmt.Errorf("metrics address: %w", err)
		}
		n.health = &http.Server{Handler: m.Handler(h), ReadHeaderTimeout: 10 * time.Second}
		go func() { _ = n.health.Serve(ml) }()
		klog.InfoS("Serving metrics and health", "address", ml.Addr().String())
	}
	path := f.lockFile
	if path == "" {
		var err error
		if path, err = driver.DefaultLockPath(f.endpoint); err != nil {
			n.Release()
			return nil, err
		}
	}
	lock, err := driver.AcquireNodeLock(ctx, path, func(holder string) {
		klog.InfoS("Waiting for the node lock: another instance serves the node; this one takes over when it exits",
			"lock", path, "holder", holder)
	})
	if err != nil {
		n.Release()
		if errors.Is(err, ctx.Err()) {
			klog.InfoS("Stopped while waiting for the node lock")
			return nil, nil
		}
		return nil, err
	}
	n.lock = lock
	ready.Held()
	m.NodeLockHeld(true)
	klog.InfoS("Holding the node lock", "lock", path)
	return n, nil
}

// Release stops the health server and lets the node lock go: the next
// instance goes on.
func (n *heldNode) Release() {
	if n.health != nil {
		_ = n.health.Close()
	}
	if err := n.lock.Release(); err != nil {
		klog.ErrorS(err, "Releasing the node lock")
	}
}
