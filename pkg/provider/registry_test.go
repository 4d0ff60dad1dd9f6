package provider_test

import (
	"context"
	"sync"
	"testing"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

type named string

func (named) Issue(context.Context, provider.Request) (provider.Lease, error) {
	return provider.Lease{}, nil
}
func (named) Renew(_ context.Context, l provider.Lease) (provider.Lease, error) { return l, nil }
func (named) Revoke(context.Context, provider.Lease) error                      { return nil }

// TestRegistryReplaceWhileGet swaps the providers while readers look them
// up (run with -race): every Get sees one whole generation.
func TestRegistryReplaceWhileGet(t *testing.T) {
	gen := func(g string, names ...string) *provider.Registry {
		r := &provider.Registry{}
		for _, n := range names {
			if err := r.Register(n, named(g)); err != nil {
				t.Fatal(err)
			}
		}
		return r
	}
	reg := gen("1", "postgres", "vault")
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				if _, ok := reg.Get("postgres"); !ok {
					t.Error("postgres missing during a swap")
					return
				}
				_ = reg.Names()
			}
		}()
	}
	for i := range 200 {
		if i%2 == 0 {
			reg.Replace(gen("2", "postgres"))
		} else {
			reg.Replace(gen("3", "postgres", "aws"))
		}
	}
	close(stop)
	wg.Wait()
	if p, _ := reg.Get("postgres"); p != named("3") {
		t.Errorf("after the last swap: %v", p)
	}
	if names := reg.Names(); len(names) != 2 || names[0] != "aws" {
		t.Errorf("names after the last swap: %v", names)
	}
	if _, ok := reg.Get("vault"); ok {
		t.Errorf("a provider removed by the swap is still there")
	}
}
