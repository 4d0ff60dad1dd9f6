// Package realcluster runs the driver the way users meet it: its image
// imported into containerd, installed from the chart with helm, registered
// with a real kubelet, and called by that kubelet for real pods whose
// containers log in with the credentials they read from the volume.
//
// The test binary runs itself again inside the node's namespaces (see
// package node), so the cluster's network, iptables rules and mounts never
// reach the host.
package realcluster

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/image"
	"github.com/ephemeral-secrets/csi-driver/test/node"
)

var (
	cluster  *node.Node
	db       *node.Database
	repoRoot string
)

func TestMain(m *testing.M) {
	if !node.Inside() {
		os.Exit(node.RunInside())
	}
	os.Exit(run(m))
}

func run(m *testing.M) int {
	fail := func(err error) int { fmt.Println("realcluster:", err); return 1 }
	var err error
	if repoRoot, err = filepath.Abs("../.."); err != nil {
		return fail(err)
	}
	ctx := context.Background()
	work, err := os.MkdirTemp("", "esc-realcluster-")
	if err != nil {
		return fail(err)
	}
	keep := false
	defer func() {
		if !keep {
			os.RemoveAll(work)
		}
	}()
	imgDir := filepath.Join(work, "images")
	if err := os.MkdirAll(imgDir, 0o755); err != nil {
		return fail(err)
	}
	start := time.Now()
	images, err := node.Images(ctx, repoRoot, imgDir)
	if err != nil {
		return fail(err)
	}
	fmt.Printf("realcluster: images built in %s\n", time.Since(start).Round(time.Millisecond))
	start = time.Now()
	cluster, err = node.Start(ctx, node.Options{Work: filepath.Join(work, "node"), Images: images, PauseImage: image.PauseImage,
		Logf: func(f string, a ...any) { fmt.Printf("realcluster: "+f+"\n", a...) }})
	if err != nil {
		return fail(err)
	}
	defer cluster.Stop()
	fmt.Printf("realcluster: node Ready in %s\n", time.Since(start).Round(time.Millisecond))
	if db, err = node.StartDatabase(ctx); err != nil {
		return fail(err)
	}
	defer db.Close()
	harness.RegisterLog(db.LogFile)
	code := m.Run()
	if code != 0 {
		fmt.Println(cluster.Describe(ctx))
		dumpLogs()
		keep = true
		fmt.Printf("realcluster: the node's files and logs are kept in %s\n", work)
	}
	for _, l := range cluster.LogFiles {
		harness.RegisterLog(l)
	}
	if c := harness.ReportLogs(); c != 0 && code == 0 {
		code = c
	}
	return code
}

// dumpLogs prints the end of each component's log, for a failed run.
func dumpLogs() {
	for _, l := range cluster.LogFiles {
		b, _ := os.ReadFile(l)
		if len(b) > 3000 {
			b = b[len(b)-3000:]
		}
		fmt.Printf("==== %s (end) ====\n%s\n", filepath.Base(l), b)
	}
}
