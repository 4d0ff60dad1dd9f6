package metrics

import (
	"context"
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Check is one condition of /healthz or /readyz: nil while it holds, else
// an error that says why not (it is the response's body: nothing secret).
// It is called with the request's context.
type Check func(ctx context.Context) error

// Health is what the health endpoints report.
type Health struct {
	// Live is the liveness probe's condition (/healthz): its failure
	// restarts the driver. Nil: the process answers, so it is live.
	Live Check
	// Ready is the readiness probe's condition (/readyz). Nil: ready.
	Ready Check
}

func (m *Metrics) registerHealth() {
	m.lockHeld = prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: namespace, Name: "node_lock_held",
		Help: "1 while this instance holds the node lock and serves the node; 0 while it waits for it (a standby: the other instance serves).",
	})
	m.reg.MustRegister(m.lockHeld)
}

// NodeLockHeld records whether this instance holds the node lock.
func (m *Metrics) NodeLockHeld(held bool) {
	if m == nil {
		return
	}
	v := 0.0
	if held {
		v = 1
	}
	m.lockHeld.Set(v)
}

// Handler serves /metrics, /healthz (h.Live) and /readyz (h.Ready).
func (m *Metrics) Handler(h Health) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{}))
	mux.Handle("/healthz", checkHandler(h.Live))
	mux.Handle("/readyz", checkHandler(h.Ready))
	return mux
}

func checkHandler(c Check) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if c != nil {
			if err := c(r.Context()); err != nil {
				http.Error(w, err.Error(), http.StatusServiceUnavailable)
				return
			}
		}
		_, _ = w.Write([]byte("ok\n"))
	}
}
