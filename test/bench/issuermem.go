package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"k8s.io/client-go/kubernetes"

	"github.com/ephemeral-secrets/csi-driver/test/issuertest"
	"github.com/ephemeral-secrets/csi-driver/test/kube"
	"github.com/ephemeral-secrets/csi-driver/test/pgtest"
)

// issuerMemory starts one replica of the cluster issuer (bin issuer) on
// a real API server (test/kube) and the benchmark's PostgreSQL, waits for
// it to lead (its inventory informer synced, its certificates made), and
// reads its memory after it has idled a few seconds.
func issuerMemory(ctx context.Context, bin string, pg *pgtest.Server) (memory, error) {
	dir, err := os.MkdirTemp("", "esc-bench-issuer-mem-")
	if err != nil {
		return memory{}, err
	}
	defer os.RemoveAll(dir)
	cluster, err := kube.Start()
	if err != nil {
		return memory{}, err
	}
	defer cluster.Stop()
	admin, err := kubernetes.NewForConfig(cluster.Config())
	if err != nil {
		return memory{}, err
	}
	issuerKC, _, err := issuertest.Cluster{CS: admin}.Setup(ctx, cluster, dir)
	if err != nil {
		return memory{}, err
	}
	backends := filepath.Join(dir, "backends.yaml")
	if err := os.WriteFile(backends, []byte(fmt.Sprintf(backendsYAML, pg.AdminURL())), 0o600); err != nil {
		return memory{}, err
	}
	is, err := issuertest.StartIssuer(bin, "issuer-mem", "", issuerKC, backends, "-v", "0")
	if err != nil {
		return memory{}, err
	}
	defer is.Stop()
	deadline := time.Now().Add(time.Minute)
	for {
		if leading, _ := is.Leading(); leading {
			break
		}
		if is.Exited() || time.Now().After(deadline) {
			return memory{}, errors.New("the issuer did not lead within a minute (see its log " + is.LogFile + ")")
		}
		time.Sleep(200 * time.Millisecond)
	}
	time.Sleep(3 * time.Second)
	var m memory
	m.Idle, m.IdleAnon, err = rssMiB(is.Pid())
	return m, err
}
