// Package driver serves the CSI Identity and Node services: it validates
// requests, hands them to the lease manager and maps the outcome to CSI
// error codes, all in one place.
//
// It is the top of the node's stack below the command line: it imports
// pkg/lease (the state machine it delegates to), pkg/spc, pkg/render,
// pkg/storage (target path policy, errors), pkg/limits, pkg/events,
// pkg/metrics and pkg/provider, and nothing imports it but pkg/cli.
package driver

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"runtime"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/wrapperspb"
	"k8s.io/klog/v2"

	"github.com/ephemeral-secrets/csi-driver/pkg/events"
	"github.com/ephemeral-secrets/csi-driver/pkg/lease"
	"github.com/ephemeral-secrets/csi-driver/pkg/metrics"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/spc"
	"github.com/ephemeral-secrets/csi-driver/pkg/storage"
)

// Name is the CSI driver name.
const Name = "ephemeral-secrets.csi.dev"

// Lifecycle is what the driver needs of the lease manager.
type Lifecycle interface {
	Publish(ctx context.Context, v lease.Volume) error
	Unpublish(ctx context.Context, volumeID, target string) error
	Ready() bool
	// Published reports whether the volume is published: a publish of it
	// is a republish.
	Published(volumeID string) bool
}

var _ Lifecycle = (*lease.Manager)(nil)

// Options configure a Driver.
type Options struct {
	NodeID  string
	Version string
	Leases  Lifecycle
	Targets storage.TargetPolicy
	// Metrics records each call's duration; nil records nothing.
	Metrics *metrics.Metrics
	// Events receives a warning for the pod of each failed publish; nil
	// sends none.
	Events events.Sink
	// Tokens is where kubelet puts the pod's service-account tokens (the
	// zero value: in secrets, as the CSIDriver's serviceAccountTokenInSecrets
	// says); the same key anywhere else is the pod's and refused.
	Tokens spc.TokenSource
	// Admission admits or refuses new publishes (the admin's per-tenant
	// limits); nil admits all.
	Admission Admission
}

// Admission decides whether a publish may go ahead; done is called once
// it has finished. A republish must always be admitted.
type Admission interface {
	Admit(volumeID string, pod provider.Pod) (done func(), err error)
}

// Driver implements csi.IdentityServer and csi.NodeServer.
type Driver struct {
	csi.UnimplementedIdentityServer
	csi.UnimplementedNodeServer
	opts Options
}

// New returns a Driver.
func New(opts Options) *Driver {
	if opts.Version == "" {
		opts.Version = "dev"
	}
	return &Driver{opts: opts}
}

// Listen opens the endpoint ("unix:///path" or "unix:/path"), removing a
// stale socket left by a previous run.
//
// Only the holder of the node lock (AcquireNodeLock) may call it: the
// socket it removes may be another live instance's.
func Listen(endpoint string) (net.Listener, error) {
	path, err := socketPath(endpoint)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, err
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("removing stale socket: %w", err)
	}
	return net.Listen("unix", path)
}

// socketPath is the file of a unix endpoint.
func socketPath(endpoint string) (string, error) {
	u, err := url.Parse(endpoint)
	if err != nil || u.Scheme != "unix" {
		return "", fmt.Errorf("endpoint %q: only unix:///path is supported", endpoint)
	}
	if u.Path != "" {
		return u.Path, nil
	}
	if u.Opaque != "" {
		return u.Opaque, nil
	}
	return "", fmt.Errorf("endpoint %q: no path", endpoint)
}

// Serve serves d on l until ctx is cancelled.
func (d *Driver) Serve(ctx context.Context, l net.Listener) error {
	// Stream workers are reused goroutines: a call does not start on a
	// fresh stack that must grow again each time.
	srv := grpc.NewServer(grpc.UnaryInterceptor(d.observe), grpc.NumStreamWorkers(uint32(runtime.GOMAXPROCS(0))))
	csi.RegisterIdentityServer(srv, d)
	csi.RegisterNodeServer(srv, d)
	go func() {
		<-ctx.Done()
		srv.GracefulStop()
	}()
	klog.InfoS("Serving CSI", "driver", Name, "endpoint", l.Addr().String())
	return srv.Serve(l)
}

// GetPluginInfo implements csi.IdentityServer.
func (d *Driver) GetPluginInfo(context.Context, *csi.GetPluginInfoRequest) (*csi.GetPluginInfoResponse, error) {
	return &csi.GetPluginInfoResponse{Name: Name, VendorVersion: d.opts.Version}, nil
}

// GetPluginCapabilities implements csi.IdentityServer: a node-only plugin
// has none to announce.
func (d *Driver) GetPluginCapabilities(context.Context, *csi.GetPluginCapabilitiesRequest) (*csi.GetPluginCapabilitiesResponse, error) {
	return &csi.GetPluginCapabilitiesResponse{}, nil
}

// Probe implements csi.IdentityServer: ready once recovery has finished.
func (d *Driver) Probe(context.Context, *csi.ProbeRequest) (*csi.ProbeResponse, error) {
	return &csi.ProbeResponse{Ready: wrapperspb.Bool(d.opts.Leases.Ready())}, nil
}

// NodeGetCapabilities implements csi.NodeServer.
func (d *Driver) NodeGetCapabilities(context.Context, *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	return &csi.NodeGetCapabilitiesResponse{Capabilities: []*csi.NodeServiceCapability{{
		Type: &csi.NodeServiceCapability_Rpc{Rpc: &csi.NodeServiceCapability_RPC{
			Type: csi.NodeServiceCapability_RPC_VOLUME_MOUNT_GROUP,
		}},
	}}}, nil
}

// NodeGetInfo implements csi.NodeServer.
func (d *Driver) NodeGetInfo(context.Context, *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	return &csi.NodeGetInfoResponse{NodeId: d.opts.NodeID}, nil
}

// NodePublishVolume implements csi.NodeServer: validate, delegate, map errors.
func (d *Driver) NodePublishVolume(ctx context.Context, req *csi.NodePublishVolumeRequest) (*csi.NodePublishVolumeResponse, error) {
	v, err := d.volumeFor(req)
	if err != nil && d.opts.Leases.Published(req.GetVolumeId()) {
		// A republish the first publish's checks would now refuse (the
		// tokens moved to where they are not expected, say) is not worth
		// tearing down a running pod's mount: never a final code.
		err = fmt.Errorf("%w: republish: %w", provider.ErrUnavailable, err)
	}
	if err == nil {
		err = d.publish(ctx, v)
	}
	if err != nil {
		d.warn(v, err)
		return nil, toStatus(err)
	}
	return &csi.NodePublishVolumeResponse{}, nil
}

// publish admits the publish, then hands it to the lease manager.
func (d *Driver) publish(ctx context.Context, v lease.Volume) error {
	if d.opts.Admission == nil {
		return d.opts.Leases.Publish(ctx, v)
	}
	done, err := d.opts.Admission.Admit(v.ID, v.Mount.Pod)
	if err != nil {
		return err
	}
	defer done()
	return d.opts.Leases.Publish(ctx, v)
}

// NodeUnpublishVolume implements csi.NodeServer. Unknown volumes are fine:
// kubelet retries any error forever.
func (d *Driver) NodeUnpublishVolume(ctx context.Context, req *csi.NodeUnpublishVolumeRequest) (*csi.NodeUnpublishVolumeResponse, error) {
	if req.GetVolumeId() == "" {
		return nil, toStatus(fmt.Errorf("%w: volume_id is required", errInvalid))
	}
	if req.GetTargetPath() == "" {
		return nil, toStatus(fmt.Errorf("%w: target_path is required", errInvalid))
	}
	if err := d.opts.Leases.Unpublish(ctx, req.GetVolumeId(), req.GetTargetPath()); err != nil {
		return nil, toStatus(err)
	}
	return &csi.NodeUnpublishVolumeResponse{}, nil
}

// volumeFor checks a publish request and turns it into a lease.Volume.
func (d *Driver) volumeFor(req *csi.NodePublishVolumeRequest) (lease.Volume, error) {
	var v lease.Volume
	switch {
	case req.GetVolumeId() == "":
		return v, fmt.Errorf("%w: volume_id is required", errInvalid)
	case req.GetTargetPath() == "":
		return v, fmt.Errorf("%w: target_path is required", errInvalid)
	case req.GetVolumeCapability() == nil:
		return v, fmt.Errorf("%w: volume_capability is required", errInvalid)
	case req.GetVolumeCapability().GetMount() == nil:
		return v, fmt.Errorf("%w: only the mount access type is supported", errInvalid)
	case !req.GetReadonly():
		return v, fmt.Errorf("%w: the volume must be read-only (readOnly: true in the pod's volume)", errInvalid)
	}
	mnt, err := spc.ParseVolumeContext(req.GetVolumeContext(), req.GetSecrets(), d.opts.Tokens)
	v.Mount = mnt // the pod, if known, for the event of a failure
	if err != nil {
		return v, err
	}
	// The shape only: the manager walks the path for symlinks right before
	// it mounts, which a republish of a live mount does not.
	if err := d.opts.Targets.CheckPath(req.GetTargetPath(), mnt.Pod.UID); err != nil {
		return v, err
	}
	group := req.GetVolumeCapability().GetMount().GetVolumeMountGroup()
	gid, err := lease.ParseGID(group)
	if err != nil {
		return v, fmt.Errorf("%w: %v", errInvalid, err)
	}
	attrs := make(map[string]string, len(req.GetVolumeContext()))
	for k, val := range req.GetVolumeContext() {
		if k != spc.TokensKey {
			attrs[k] = val
		}
	}
	return lease.Volume{
		ID: req.GetVolumeId(), TargetPath: req.GetTargetPath(), ReadOnly: true,
		MountGroup: group, GID: gid, Attributes: attrs, Mount: mnt,
	}, nil
}
