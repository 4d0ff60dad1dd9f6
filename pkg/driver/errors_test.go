package driver

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"google.golang.org/grpc/codes"

	"github.com/ephemeral-secrets/csi-driver/pkg/lease"
	"github.com/ephemeral-secrets/csi-driver/pkg/limits"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/render"
	"github.com/ephemeral-secrets/csi-driver/pkg/spc"
	"github.com/ephemeral-secrets/csi-driver/pkg/storage"
)

func TestCodeFor(t *testing.T) {
	wrap := func(err error) error { return fmt.Errorf("class ns/x: %w", err) }
	for _, tc := range []struct {
		err  error
		want codes.Code
	}{
		{nil, codes.OK},
		{wrap(errInvalid), codes.InvalidArgument},
		{wrap(spc.ErrInvalidContext), codes.InvalidArgument},
		{wrap(storage.ErrInvalidPath), codes.InvalidArgument},
		{wrap(render.ErrInvalidSpec), codes.InvalidArgument},
		{wrap(provider.ErrInvalidParameters), codes.InvalidArgument},
		{wrap(lease.ErrUnknownProvider), codes.InvalidArgument},
		{wrap(provider.ErrPermissionDenied), codes.PermissionDenied},
		{wrap(spc.ErrClassNotFound), codes.NotFound},
		{wrap(provider.ErrNotFound), codes.NotFound},
		{wrap(lease.ErrIncompatible), codes.AlreadyExists},
		{wrap(storage.ErrTooLarge), codes.ResourceExhausted},
		{wrap(limits.ErrLimited), codes.ResourceExhausted},
		{fmt.Errorf("%w: %w", render.ErrInvalidSpec, render.ErrBudget), codes.InvalidArgument},
		{wrap(provider.ErrMisconfigured), codes.FailedPrecondition},
		{wrap(provider.ErrUnavailable), codes.Unavailable},
		{wrap(lease.ErrNotReady), codes.Unavailable},
		{wrap(context.DeadlineExceeded), codes.DeadlineExceeded},
		{errors.New("disk on fire"), codes.Internal},
		// A republish wraps whatever went wrong in ErrUnavailable: never a final code.
		{fmt.Errorf("%w: restoring the mount: %w", provider.ErrUnavailable, storage.ErrInvalidPath), codes.Unavailable},
	} {
		if got := codeFor(tc.err); got != tc.want {
			t.Errorf("codeFor(%v) = %s, want %s", tc.err, got, tc.want)
		}
	}
}
