package lease

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"
)

// Concurrent GRANTs on one table make PostgreSQL fail some with "tuple
// concurrently updated" (XX000): a transient condition the provider
// retries, so that every one of 64 concurrent publishes succeeds.
func TestConcurrentPublishesGrantingOnOneTableAllSucceed(t *testing.T) {
	srv := needPostgres(t)
	ctx := context.Background()
	if err := srv.Exec(ctx, `CREATE TABLE IF NOT EXISTS public.shared_items (id int)`); err != nil {
		t.Fatal(err)
	}
	n := newNode(t, time.Hour,
		`CREATE ROLE "{{.Name}}" LOGIN PASSWORD '{{.Password}}' VALID UNTIL '{{.Expiration}}'`,
		`GRANT SELECT ON public.shared_items TO "{{.Name}}"`)
	m := n.manager(n.store, n.prov, Options{BackendTimeout: 30 * time.Second})
	defer m.Close()
	if err := m.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	const pods = 64
	vols := make([]Volume, pods)
	for i := range vols {
		vols[i] = n.volume(fmt.Sprintf("c%02d", i))
	}
	errs := make([]error, pods)
	var wg sync.WaitGroup
	for i := range vols {
		wg.Go(func() { errs[i] = m.Publish(ctx, vols[i]) })
	}
	wg.Wait()
	failed := 0
	for i, err := range errs {
		if err != nil {
			failed++
			t.Errorf("publish %d: %v", i, err)
		}
	}
	if failed > 0 {
		t.Fatalf("%d of %d concurrent publishes failed", failed, pods)
	}
	for _, v := range vols {
		if err := n.login(ctx, v.TargetPath); err != nil {
			t.Errorf("%s: %v", v.ID, err)
		}
		unpublish(t, m, v)
	}
	m.drain(ctx)
	if alive := n.alive(ctx); len(alive) > 0 {
		t.Errorf("%d roles left after unpublish", len(alive))
	}
}
