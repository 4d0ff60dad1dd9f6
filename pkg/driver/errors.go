package driver

import (
	"context"
	"errors"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	"github.com/ephemeral-secrets/csi-driver/pkg/lease"
	"github.com/ephemeral-secrets/csi-driver/pkg/limits"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/render"
	"github.com/ephemeral-secrets/csi-driver/pkg/spc"
	"github.com/ephemeral-secrets/csi-driver/pkg/storage"
)

// errInvalid marks a malformed request.
var errInvalid = errors.New("invalid request")

// codeFor is the one place where errors become CSI codes. The order
// matters: Unavailable first, since a republish wraps whatever went wrong
// in it (a final code would make kubelet tear down a running pod's mount).
func codeFor(err error) codes.Code {
	switch {
	case err == nil:
		return codes.OK
	case errors.Is(err, provider.ErrUnavailable),
		errors.Is(err, lease.ErrNotReady),
		errors.Is(err, spc.ErrNotSynced):
		return codes.Unavailable
	case errors.Is(err, context.DeadlineExceeded):
		return codes.DeadlineExceeded
	case errors.Is(err, context.Canceled):
		return codes.Canceled
	case errors.Is(err, errInvalid),
		errors.Is(err, spc.ErrInvalidContext),
		errors.Is(err, storage.ErrInvalidPath),
		errors.Is(err, render.ErrInvalidSpec),
		errors.Is(err, provider.ErrInvalidParameters),
		errors.Is(err, lease.ErrUnknownProvider):
		return codes.InvalidArgument
	case errors.Is(err, provider.ErrPermissionDenied):
		return codes.PermissionDenied
	case errors.Is(err, spc.ErrClassNotFound),
		errors.Is(err, provider.ErrNotFound):
		return codes.NotFound
	case errors.Is(err, lease.ErrIncompatible):
		return codes.AlreadyExists
	case errors.Is(err, storage.ErrTooLarge),
		errors.Is(err, limits.ErrLimited):
		return codes.ResourceExhausted
	case errors.Is(err, provider.ErrMisconfigured):
		return codes.FailedPrecondition
	default:
		return codes.Internal
	}
}

// reasons name a failed publish in the pod's events, by CSI code.
var reasons = map[codes.Code]string{
	codes.InvalidArgument:   "InvalidVolumeRequest",
	codes.NotFound:          "SecretProviderClassNotFound",
	codes.PermissionDenied:  "CredentialNotAllowed",
	codes.ResourceExhausted: "VolumeTooLarge",
	codes.AlreadyExists:     "VolumeConflict",
	codes.Unavailable:       "BackendUnavailable",
	codes.DeadlineExceeded:  "BackendTimeout",

	codes.FailedPrecondition: "BackendMisconfigured",
}

// warn sends the pod a Warning event saying why its volume failed, when
// the pod is known.
func (d *Driver) warn(v lease.Volume, err error) {
	pod := v.Mount.Pod
	if d.opts.Events == nil || pod.Name == "" || pod.Namespace == "" {
		return
	}
	reason, ok := reasons[codeFor(err)]
	switch {
	case errors.Is(err, limits.ErrLimited):
		reason = "TenantLimitReached"
	case !ok:
		reason = "PublishFailed"
	}
	msg := "ephemeral-secrets: " + err.Error()
	if v.Mount.Class != "" {
		msg = "ephemeral-secrets: class " + v.Mount.Class + ": " + err.Error()
	}
	d.opts.Events.Warning(pod, reason, msg)
}

func toStatus(err error) error {
	return status.Error(codeFor(err), err.Error())
}

type volumeRequest interface{ GetVolumeId() string }

// observe logs every call's method, volume, duration and code, and
// records its duration. Requests are never logged: they carry
// service-account tokens.
func (d *Driver) observe(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	start := time.Now()
	resp, err := handler(ctx, req)
	vol := ""
	if r, ok := req.(volumeRequest); ok {
		vol = r.GetVolumeId()
	}
	took := time.Since(start)
	code := status.Code(err)
	d.opts.Metrics.RPC(info.FullMethod[strings.LastIndex(info.FullMethod, "/")+1:], code.String(), took)
	kv := []any{"method", info.FullMethod, "volumeID", vol, "duration", took, "code", code.String()}
	switch {
	case err != nil:
		klog.ErrorS(err, "CSI call failed", kv...)
	case info.FullMethod == "/csi.v1.Identity/Probe" || info.FullMethod == "/csi.v1.Node/NodeGetCapabilities":
		klog.V(5).InfoS("CSI call", kv...)
	default:
		klog.V(2).InfoS("CSI call", kv...)
	}
	return resp, err
}
