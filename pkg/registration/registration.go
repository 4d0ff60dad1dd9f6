// Package registration registers the driver with kubelet's plugin
// watcher, the job the node-driver-registrar sidecar does for other CSI
// drivers: a gRPC Registration service on a socket in kubelet's
// plugins_registry directory. Kubelet notices the socket, asks GetInfo for
// the driver's name and CSI endpoint, checks the driver (NodeGetInfo), and
// reports the outcome with NotifyRegistrationStatus. Removing the socket
// deregisters the driver.
//
// Doing it in the driver saves an image and a container per node, and
// ties the registration's life to the driver's: kubelet never sees a
// registered driver whose process is gone.
//
// It imports none of our packages.
package registration

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"k8s.io/klog/v2"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

// Options configure a Registrar.
type Options struct {
	// DriverName is the CSI driver's name.
	DriverName string
	// Dir is kubelet's plugins_registry directory as this process sees it.
	Dir string
	// Endpoint is the CSI socket's path as kubelet sees it (on the host).
	Endpoint string
	// CheckInterval is how often the socket is checked and, if it was
	// removed, made again (default 10 s).
	CheckInterval time.Duration
}

// Registrar serves kubelet's Registration API.
type Registrar struct {
	registerapi.UnimplementedRegistrationServer
	opts Options

	mu         sync.Mutex
	registered bool
	lastError  string
}

// New returns a Registrar; Run serves it.
func New(opts Options) *Registrar {
	if opts.CheckInterval <= 0 {
		opts.CheckInterval = 10 * time.Second
	}
	return &Registrar{opts: opts}
}

// SocketPath is where the registration socket is made.
func (r *Registrar) SocketPath() string {
	return filepath.Join(r.opts.Dir, r.opts.DriverName+"-reg.sock")
}

// GetInfo tells kubelet what the plugin is and where its CSI socket is.
func (r *Registrar) GetInfo(context.Context, *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	return &registerapi.PluginInfo{
		Type:              registerapi.CSIPlugin,
		Name:              r.opts.DriverName,
		Endpoint:          r.opts.Endpoint,
		SupportedVersions: []string{"1.0.0"},
	}, nil
}

// NotifyRegistrationStatus records kubelet's verdict.
func (r *Registrar) NotifyRegistrationStatus(_ context.Context, s *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	r.mu.Lock()
	r.registered, r.lastError = s.PluginRegistered, s.Error
	r.mu.Unlock()
	if s.PluginRegistered {
		klog.InfoS("Kubelet registered the driver", "endpoint", r.opts.Endpoint)
	} else {
		klog.ErrorS(nil, "Kubelet refused the driver's registration", "reason", s.Error)
	}
	return &registerapi.RegistrationStatusResponse{}, nil
}

// Healthy is false once kubelet has refused the registration: the
// liveness probe then restarts the driver, which registers again.
func (r *Registrar) Healthy() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.registered && r.lastError != "" {
		return fmt.Errorf("kubelet refused the registration: %s", r.lastError)
	}
	return nil
}

// Registered tells whether kubelet has confirmed the registration.
func (r *Registrar) Registered() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.registered
}

// Run serves the registration socket until ctx ends, then removes it so
// kubelet deregisters the driver. A socket removed by someone else (a
// kubelet that cleaned its directory) is made again.
func (r *Registrar) Run(ctx context.Context) error {
	srv := grpc.NewServer()
	registerapi.RegisterRegistrationServer(srv, r)
	defer srv.Stop()
	path := r.SocketPath()
	ino, err := r.listen(srv, path)
	if err != nil {
		return err
	}
	defer func() { _ = removeIfSame(path, ino) }()
	t := time.NewTicker(r.opts.CheckInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		if sameInode(path, ino) {
			continue
		}
		klog.InfoS("Registration socket vanished; making it again", "path", path)
		r.mu.Lock()
		r.registered, r.lastError = false, ""
		r.mu.Unlock()
		if ino, err = r.listen(srv, path); err != nil {
			return err
		}
	}
}

// listen makes the socket and serves srv on it; it returns the socket's
// inode, by which Run knows whether the file is still its own.
func (r *Registrar) listen(srv *grpc.Server, path string) (uint64, error) {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return 0, fmt.Errorf("registration socket: %w", err)
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return 0, fmt.Errorf("registration socket: %w", err)
	}
	// The listener must not unlink the path when it closes: by then the
	// path may be a newer socket.
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		l.Close()
		return 0, fmt.Errorf("registration socket: %w", err)
	}
	go func() { _ = srv.Serve(l) }()
	klog.InfoS("Serving kubelet plugin registration", "path", path, "endpoint", r.opts.Endpoint)
	return st.Ino, nil
}

func sameInode(path string, ino uint64) bool {
	var st syscall.Stat_t
	return syscall.Stat(path, &st) == nil && st.Ino == ino
}

func removeIfSame(path string, ino uint64) error {
	if !sameInode(path, ino) {
		return nil
	}
	return os.Remove(path)
}
