package tenant

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/kube"
	"github.com/ephemeral-secrets/csi-driver/test/vaulttest"
)

var (
	vaultOnce sync.Once
	vaultSrv  *vaulttest.Server
	vaultErr  error

	kubeOnce sync.Once
	cluster  *kube.Cluster
	kubeErr  error
)

// realVault starts the suite's Vault dev server once: jwt auth role "app"
// for team-a/app with audience "vault", a database role on the suite's
// PostgreSQL and a KV secret.
func realVault(t *testing.T) *vaulttest.Server {
	t.Helper()
	vaultOnce.Do(func() {
		if vaultSrv, vaultErr = vaulttest.Start(); vaultErr != nil {
			return
		}
		harness.RegisterLog(vaultSrv.LogFile)
		vaultErr = vaultSrv.Setup(context.Background(), pg.AdminURL(), "team-a", "app", time.Hour, 2*time.Hour)
	})
	if vaultErr != nil {
		t.Fatal(vaultErr)
	}
	return vaultSrv
}

// realCluster starts etcd and kube-apiserver once, for events.
func realCluster(t *testing.T) *kube.Cluster {
	t.Helper()
	kubeOnce.Do(func() {
		if cluster, kubeErr = kube.Start(); kubeErr != nil {
			return
		}
		for _, l := range cluster.LogFiles {
			harness.RegisterLog(l)
		}
	})
	if kubeErr != nil {
		t.Fatal(kubeErr)
	}
	return cluster
}

func stopServers() {
	if vaultSrv != nil {
		vaultSrv.Close()
	}
	if cluster != nil {
		cluster.Stop()
	}
}
