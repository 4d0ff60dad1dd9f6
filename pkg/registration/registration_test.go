package registration

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

// dial calls the registration socket the way kubelet's plugin watcher does.
func dial(t *testing.T, path string) registerapi.RegistrationClient {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return registerapi.NewRegistrationClient(conn)
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatalf("timed out waiting for %s", what)
}

func exists(path string) bool { _, err := os.Stat(path); return err == nil }

func TestRegistrationLifecycle(t *testing.T) {
	dir := t.TempDir()
	r := New(Options{DriverName: "ephemeral-secrets.csi.dev", Dir: dir,
		Endpoint: "/var/lib/kubelet/plugins/ephemeral-secrets.csi.dev/csi.sock", CheckInterval: 20 * time.Millisecond})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	path := filepath.Join(dir, "ephemeral-secrets.csi.dev-reg.sock")
	if r.SocketPath() != path {
		t.Fatalf("socket path %s, want %s", r.SocketPath(), path)
	}
	waitFor(t, "the socket", func() bool { return exists(path) })

	c := dial(t, path)
	info, err := c.GetInfo(ctx, &registerapi.InfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if info.Type != registerapi.CSIPlugin || info.Name != "ephemeral-secrets.csi.dev" ||
		info.Endpoint != "/var/lib/kubelet/plugins/ephemeral-secrets.csi.dev/csi.sock" || len(info.SupportedVersions) != 1 {
		t.Fatalf("GetInfo = %+v", info)
	}
	if r.Registered() || r.Healthy() != nil {
		t.Fatal("registered or unhealthy before kubelet said anything")
	}
	if _, err := c.NotifyRegistrationStatus(ctx, &registerapi.RegistrationStatus{PluginRegistered: false, Error: "bad version"}); err != nil {
		t.Fatal(err)
	}
	if r.Healthy() == nil {
		t.Fatal("healthy after kubelet refused the registration")
	}
	if _, err := c.NotifyRegistrationStatus(ctx, &registerapi.RegistrationStatus{PluginRegistered: true}); err != nil {
		t.Fatal(err)
	}
	if !r.Registered() || r.Healthy() != nil {
		t.Fatal("not registered after kubelet confirmed")
	}

	// A socket someone removed is made again, and answers.
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the socket to be made again", func() bool { return exists(path) })
	if _, err := dial(t, path).GetInfo(ctx, &registerapi.InfoRequest{}); err != nil {
		t.Fatal(err)
	}
	if r.Registered() {
		t.Fatal("still registered after the socket was replaced; kubelet must confirm again")
	}

	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if exists(path) {
		t.Fatal("socket left behind after Run returned: kubelet would keep the driver registered")
	}
}
