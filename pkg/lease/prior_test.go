package lease

import (
	"context"
	"maps"
	"sync"
	"testing"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/spc"
)

// reissuing is a provider that cannot extend a lease, so that every
// renewal re-issues, and that remembers the Prior of each Issue and
// whether the pod asked for it (Fresh).
type reissuing struct {
	provider.Provider
	mu     sync.Mutex
	priors []*provider.Lease
	fresh  []bool
}

func (r *reissuing) Issue(ctx context.Context, req provider.Request) (provider.Lease, error) {
	r.mu.Lock()
	var p *provider.Lease
	if req.Prior != nil {
		c := *req.Prior
		c.Values = maps.Clone(req.Prior.Values)
		p = &c
	}
	r.priors = append(r.priors, p)
	r.fresh = append(r.fresh, req.Fresh)
	r.mu.Unlock()
	return r.Provider.Issue(ctx, req)
}

func (r *reissuing) Renew(_ context.Context, l provider.Lease) (provider.Lease, error) {
	return l, provider.ErrNotRenewable
}

// issued are the Priors of the Issue calls so far.
func (r *reissuing) issued() []*provider.Lease {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]*provider.Lease(nil), r.priors...)
}

// asked tells, for each Issue call so far, whether it was Fresh.
func (r *reissuing) asked() []bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]bool(nil), r.fresh...)
}

// A provider is handed the lease it replaces at each re-issue (a renewal,
// a rotation the pod asks for), with its values, and nothing at a
// publish, a republish or a task's issue: what it may carry over comes
// only from the volume's own live lease. Only the rotation the pod asks
// for is Fresh: it must get a new credential, whatever its prior's
// renewal time says.
func TestReissueIsHandedThePriorLease(t *testing.T) {
	inTiers(t, time.Hour, testReissueIsHandedThePriorLease)
}

func testReissueIsHandedThePriorLease(t *testing.T, n *node) {
	ctx := context.Background()
	prov := &reissuing{Provider: n.prov}
	m := n.manager(n.store, prov, Options{})
	defer m.Close()
	if err := m.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	v := n.volume("prior")
	v.Attributes[spc.ClassKey], v.Mount.Class = "db-tasks", "db-tasks"
	publish(t, m, v)
	if p := prov.issued(); len(p) != 1 || p[0] != nil {
		t.Fatalf("publish: Issue calls %d, prior %v; want one, without a prior", len(p), p)
	}
	for range 3 { // kubelet's republish asks nothing
		publish(t, m, v)
	}
	if p := prov.issued(); len(p) != 1 {
		t.Fatalf("republish called Issue: %d calls", len(p))
	}
	leaseOf := func() provider.Lease {
		l, err := n.store.ReadLease(v.ID)
		if err != nil {
			t.Fatal(err)
		}
		return l
	}
	for i, reissue := range []func(){
		func() { m.renewNow(v.ID) },
		func() {
			if _, err := m.RotateNow(ctx, v.ID); err != nil {
				t.Fatal(err)
			}
		},
	} {
		cur := leaseOf()
		reissue()
		p := prov.issued()
		if len(p) != 2+i {
			t.Fatalf("re-issue %d: %d Issue calls, want %d", i, len(p), 2+i)
		}
		last := p[len(p)-1]
		if last == nil || last.ID != cur.ID || !maps.Equal(last.Values, cur.Values) || len(cur.Values) == 0 {
			t.Errorf("re-issue %d: prior %+v, want the live lease %s with its values", i, last, cur.ID)
		}
		if fresh := prov.asked(); fresh[len(fresh)-1] != (i == 1) {
			t.Errorf("re-issue %d: Fresh %v, want it only where the pod asked (the second)", i, fresh)
		}
		if leaseOf().ID == cur.ID {
			t.Errorf("re-issue %d did not replace the lease", i)
		}
	}
	if _, err := m.IssueTask(ctx, v.ID, "t1", 0); err != nil {
		t.Fatal(err)
	}
	if p, fresh := prov.issued(), prov.asked(); len(p) != 4 || p[3] != nil || fresh[0] || fresh[3] {
		t.Errorf("a task's issue: %d Issue calls, last prior %+v; want 4, the last without a prior, neither it nor the publish Fresh", len(p), p[len(p)-1])
	}
	unpublish(t, m, v)
	m.drain(ctx)
}
