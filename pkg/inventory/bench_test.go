package inventory_test

import (
	"context"
	"fmt"
	"testing"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"

	"github.com/ephemeral-secrets/csi-driver/pkg/inventory"
)

// BenchmarkRecordLifecycle is the inventory's cost of one credential to
// the issuer: Issuing, Withdrawn, Issued, Dropped against the real API
// server, with the issuer's informer running.
func BenchmarkRecordLifecycle(b *testing.B) {
	for _, qps := range []float32{0, -1} {
		name := "client-default-qps"
		if qps < 0 {
			name = "no-client-limit"
		}
		b.Run(name, func(b *testing.B) {
			cfg := rest.CopyConfig(issuerCfg)
			cfg.QPS = qps
			c, err := inventory.NewClient(cfg)
			if err != nil {
				b.Fatal(err)
			}
			benchmarkLifecycle(b, c)
		})
	}
}

func benchmarkLifecycle(b *testing.B, c *inventory.Client) {
	ns := namespace(b)
	pod := newPod(b, ns, "bench")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	inf := inventory.NewInformer(c, "", 0)
	go inf.Run(ctx.Done())
	cache.WaitForCacheSync(ctx.Done(), inf.HasSynced)
	rec := inventory.NewRecorder(c, inf)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		i := 0
		for pb.Next() {
			i++
			e := entryFor(pod, "node-bench", fmt.Sprintf("%s-bench-%p-%d", ns, pb, i))
			if err := rec.Issuing(ctx, e); err != nil {
				b.Error(err)
				return
			}
			if _, err := rec.Withdrawn(ctx, e); err != nil { // Mint asks it after Issuing
				b.Error(err)
				return
			}
			if err := rec.Issued(ctx, e); err != nil {
				b.Error(err)
				return
			}
			if err := rec.Dropped(ctx, e.LeaseID); err != nil {
				b.Error(err)
				return
			}
		}
	})
}
