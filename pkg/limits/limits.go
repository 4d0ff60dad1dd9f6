// Package limits bounds what one namespace can make a node's driver do:
// how many live credentials it holds on the node, how many the node holds
// in all, and how fast it may start new publishes (a token bucket per
// namespace), so that a crash-looping deployment cannot flood a backend
// or starve its neighbours. A republish of a published volume is never
// refused.
//
// It imports pkg/provider and pkg/metrics only.
package limits

import (
	"errors"
	"fmt"
	"sync"

	"golang.org/x/time/rate"

	"github.com/ephemeral-secrets/csi-driver/pkg/metrics"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// ErrLimited means a publish was refused by one of the admin's limits;
// the gRPC edge maps it to ResourceExhausted, and kubelet retries later.
var ErrLimited = errors.New("tenant limit reached")

// Which limit refused, as counted in the refusal metric.
const (
	NamespaceCap = "namespace_leases"
	NodeCap      = "node_leases"
	Rate         = "publish_rate"
)

// Live is what the limiter needs of the lease manager.
type Live interface {
	// Ready reports whether the manager knows every volume of the node.
	Ready() bool
	// Published reports whether the volume is already published.
	Published(volumeID string) bool
	// Live counts the published volumes of namespace, and of the node.
	Live(namespace string) (inNamespace, onNode int)
}

// Options are the admin's limits; zero is no limit.
type Options struct {
	// PerNamespace and PerNode cap live credentials (published volumes).
	PerNamespace, PerNode int
	// Rate is how many new publishes per second one namespace may start on
	// the node, with bursts of Burst (default: 1, or Rate rounded up).
	Rate  float64
	Burst int
	// Metrics counts refusals; nil counts nothing.
	Metrics *metrics.Metrics
}

// maxBuckets bounds the buckets kept; full ones are dropped past it.
const maxBuckets = 1024

// Limiter admits or refuses publishes. Its zero value is not usable; call New.
type Limiter struct {
	opts Options
	live Live

	mu       sync.Mutex
	inflight map[string]int // new publishes admitted and not yet done, by namespace
	total    int
	buckets  map[string]*rate.Limiter
}

// New returns a limiter over the manager's live volumes.
func New(live Live, opts Options) *Limiter {
	if opts.Rate > 0 && opts.Burst <= 0 {
		opts.Burst = max(1, int(opts.Rate+0.999))
	}
	return &Limiter{opts: opts, live: live, inflight: map[string]int{}, buckets: map[string]*rate.Limiter{}}
}

// Admit decides whether the publish of volumeID for pod may go ahead. A
// republish always may. A new volume is counted as live from now until
// done is called (the manager counts it once it is published), so that
// concurrent publishes cannot pass a cap together.
func (l *Limiter) Admit(volumeID string, pod provider.Pod) (done func(), err error) {
	none := func() {}
	if !l.live.Ready() || l.live.Published(volumeID) {
		return none, nil // a republish; or recovering, which the manager refuses itself
	}
	ns := pod.Namespace
	l.mu.Lock()
	defer l.mu.Unlock()
	inNS, onNode := l.live.Live(ns)
	inNS += l.inflight[ns]
	onNode += l.total
	switch {
	case l.opts.PerNamespace > 0 && inNS >= l.opts.PerNamespace:
		return none, l.refuse(ns, NamespaceCap, fmt.Errorf("%w: namespace %s holds %d live credentials on this node, the admin's cap "+
			"(--max-leases-per-namespace); one is freed when a pod using the driver ends", ErrLimited, ns, inNS))
	case l.opts.PerNode > 0 && onNode >= l.opts.PerNode:
		return none, l.refuse(ns, NodeCap, fmt.Errorf("%w: this node holds %d live credentials, the admin's cap (--max-leases-per-node)", ErrLimited, onNode))
	case l.opts.Rate > 0 && !l.bucket(ns).Allow():
		return none, l.refuse(ns, Rate, fmt.Errorf("%w: namespace %s starts more than %g new volumes per second on this node, the admin's limit "+
			"(--publish-rate-per-namespace); kubelet retries", ErrLimited, ns, l.opts.Rate))
	}
	l.inflight[ns]++
	l.total++
	var once sync.Once
	return func() {
		once.Do(func() {
			l.mu.Lock()
			defer l.mu.Unlock()
			if l.inflight[ns]--; l.inflight[ns] <= 0 {
				delete(l.inflight, ns)
			}
			l.total--
		})
	}, nil
}

func (l *Limiter) refuse(ns, limit string, err error) error {
	l.opts.Metrics.Refusal(ns, limit)
	return err
}

// bucket is the namespace's token bucket; under l.mu.
func (l *Limiter) bucket(ns string) *rate.Limiter {
	b, ok := l.buckets[ns]
	if ok {
		return b
	}
	if len(l.buckets) >= maxBuckets {
		for k, old := range l.buckets {
			if old.Tokens() >= float64(l.opts.Burst) {
				delete(l.buckets, k) // full again: as good as new
			}
		}
	}
	b = rate.NewLimiter(rate.Limit(l.opts.Rate), l.opts.Burst)
	l.buckets[ns] = b
	return b
}
