package driver

import (
	"context"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
)

// recovering is a Lifecycle whose recovery finishes when the test says;
// readiness only asks Ready.
type recovering struct {
	Lifecycle
	ready atomic.Bool
}

func (r *recovering) Ready() bool { return r.ready.Load() }

var _ Lifecycle = (*recovering)(nil)

func TestReadiness(t *testing.T) {
	endpoint := "unix://" + filepath.Join(t.TempDir(), "csi.sock")
	leases := &recovering{}
	registered := atomic.Bool{}
	serve := func(t *testing.T) {
		l, err := Listen(endpoint)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- New(Options{NodeID: "n", Leases: leases}).Serve(ctx, l) }()
		t.Cleanup(func() { cancel(); <-done })
	}
	for _, tc := range []struct {
		name               string
		serving, recovered bool
		held, registers    bool
		registered         bool
		wantErr            string // "" : ready
	}{
		{name: "standby, nobody serves the node", wantErr: "standby"},
		{name: "standby, the holder is recovering", serving: true, wantErr: "not ready"},
		{name: "standby, the holder serves", serving: true, recovered: true},
		{name: "holder, socket not yet served", held: true, wantErr: "does not answer"},
		{name: "holder, recovering", held: true, serving: true, wantErr: "not ready"},
		{name: "holder, no registration of its own", held: true, serving: true, recovered: true},
		{name: "holder, kubelet never registered it", held: true, serving: true, recovered: true, registers: true,
			wantErr: "kubelet has not registered"},
		{name: "holder, registered", held: true, serving: true, recovered: true, registers: true, registered: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.serving {
				serve(t)
			}
			leases.ready.Store(tc.recovered)
			registered.Store(tc.registered)
			r := &Readiness{Endpoint: endpoint}
			if tc.registers {
				r.Registered = registered.Load
			}
			if tc.held {
				r.Held()
			}
			err := r.Check(context.Background())
			switch {
			case tc.wantErr == "" && err != nil:
				t.Fatalf("not ready: %v", err)
			case tc.wantErr != "" && err == nil:
				t.Fatalf("ready; want %q", tc.wantErr)
			case tc.wantErr != "" && !strings.Contains(err.Error(), tc.wantErr):
				t.Fatalf("not ready: %v; want %q", err, tc.wantErr)
			}
		})
	}
}
