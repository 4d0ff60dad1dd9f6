package driver

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// ProbeTimeout bounds one ProbeEndpoint call.
const ProbeTimeout = 2 * time.Second

// ErrNotReady is a CSI socket that answers but whose driver is not ready
// yet (its recovery after start-up has not finished).
var ErrNotReady = errors.New("the CSI driver is not ready (recovering its volumes)")

// ProbeEndpoint calls Probe over the CSI socket as kubelet would, and
// returns nil only if a driver answers and is ready: whoever serves the
// socket, this process or the node lock's holder.
func ProbeEndpoint(ctx context.Context, endpoint string) error {
	path, err := socketPath(endpoint)
	if err != nil {
		return err
	}
	conn, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return fmt.Errorf("the CSI socket: %w", err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, ProbeTimeout)
	defer cancel()
	resp, err := csi.NewIdentityClient(conn).Probe(ctx, &csi.ProbeRequest{})
	if err != nil {
		return fmt.Errorf("the CSI socket does not answer: %w", err)
	}
	if !resp.GetReady().GetValue() {
		return ErrNotReady
	}
	return nil
}
