package harness

import (
	"context"
	"io"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/audit"
	"github.com/ephemeral-secrets/csi-driver/pkg/driver"
	"github.com/ephemeral-secrets/csi-driver/pkg/lease"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/spc"
	"github.com/ephemeral-secrets/csi-driver/pkg/storage"
)

// InProcess is the driver wired as the binary wires it, serving its real
// socket from inside the test process.
type InProcess struct {
	Env     *Env
	Manager *lease.Manager
	Store   *storage.Filesystem
	cancel  context.CancelFunc
	served  chan error
}

// InProcessOptions configure StartInProcess.
type InProcessOptions struct {
	ClassesFile string
	Providers   *provider.Registry
	Audit       io.Writer
	Lease       lease.Options // Store, Providers, Classes and Audit are filled in
}

// StartInProcess starts the driver on env's socket and waits for recovery.
func StartInProcess(env *Env, o InProcessOptions) (*InProcess, error) {
	store, err := storage.Open(env.StateDir, storage.Options{})
	if err != nil {
		return nil, err
	}
	classes, err := spc.NewFileResolver(o.ClassesFile)
	if err != nil {
		return nil, err
	}
	lo := o.Lease
	targets := storage.TargetPolicy{KubeletDir: env.KubeletDir}
	lo.Store, lo.Providers, lo.Classes, lo.VerifyTarget = lease.NewStore(store), o.Providers, classes, targets.CheckNoSymlinks
	if o.Audit != nil {
		lo.Audit = audit.New(o.Audit)
	}
	if lo.RetryMin == 0 {
		lo.RetryMin, lo.RetryMax = 100*time.Millisecond, time.Second
	}
	mgr := lease.New(lo)
	l, err := driver.Listen(env.Endpoint())
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	p := &InProcess{Env: env, Manager: mgr, Store: store, cancel: cancel, served: make(chan error, 1)}
	d := driver.New(driver.Options{NodeID: "test-node", Leases: mgr, Targets: targets})
	go func() { p.served <- d.Serve(ctx, l) }()
	if err := mgr.Recover(ctx); err != nil {
		p.Stop()
		return nil, err
	}
	go mgr.Run(ctx)
	return p, nil
}

// Stop stops serving and the manager's background work.
func (p *InProcess) Stop() {
	p.cancel()
	p.Manager.Close()
	<-p.served
}
