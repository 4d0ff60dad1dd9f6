package metrics

import "github.com/prometheus/client_golang/prometheus"

// reaper counts the passes of the issuer's reaper. The driver (whose
// in-process issuer reaps when it holds the postgres configuration
// itself) and the cluster issuer register the same collectors, so the
// series have one name and one meaning whichever process reaps.
type reaper struct {
	roles    *prometheus.CounterVec
	failures prometheus.Counter
}

// newReaper makes the reaper's collectors and registers them with reg.
func newReaper(reg prometheus.Registerer) *reaper {
	r := &reaper{
		roles: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "issuer_reaped_roles_total",
			Help: "PostgreSQL roles the issuer's reaper dropped, by reason (expired: VALID UNTIL passed; untracked: no inventory record).",
		}, []string{"reason"}),
		failures: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: namespace, Name: "issuer_reap_failures_total",
			Help: "Roles the issuer's reaper failed to drop, and connections it failed to list (retried at the next pass).",
		}),
	}
	// Both reasons from the start: an alert or a rate over a reason that
	// has not happened yet sees 0, not nothing.
	r.roles.WithLabelValues("expired")
	r.roles.WithLabelValues("untracked")
	reg.MustRegister(r.roles, r.failures)
	return r
}

// reaped records one pass: roles dropped because they expired or because
// no record held them, and failures.
func (r *reaper) reaped(expired, untracked, failures int) {
	r.roles.WithLabelValues("expired").Add(float64(expired))
	r.roles.WithLabelValues("untracked").Add(float64(untracked))
	r.failures.Add(float64(failures))
}
