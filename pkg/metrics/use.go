package metrics

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Use counts what the issuer's use sampler (pkg/issuer/use) sees of the
// sessions of the credentials it minted. The driver (whose in-process
// issuer samples when it holds the postgres configuration itself) and
// the cluster issuer register the same collectors, so the series have one
// name and one meaning whichever process samples. Labels are a
// connection's name (the admin's configuration), a role's name within it
// and an action: never a pod, a credential or an address. A nil *Use
// records nothing.
type Use struct {
	sessions  *prometheus.CounterVec
	first     *prometheus.CounterVec
	foreign   *prometheus.CounterVec
	neverUsed *prometheus.CounterVec
	unused    *prometheus.CounterVec
	blind     *prometheus.GaugeVec
	sample    *prometheus.HistogramVec
}

// newUse makes the use sampler's collectors and registers them with reg.
func newUse(reg prometheus.Registerer) *Use {
	u := &Use{
		sessions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "use_sessions_observed_total",
			Help: "New sessions of issued credentials the issuer saw in the database, by connection.",
		}, []string{"connection"}),
		first: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "use_first_total",
			Help: "Credentials seen used for the first time, by connection.",
		}, []string{"connection"}),
		foreign: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "use_foreign_total",
			Help: "Credentials used from an address none expected (not the pod's, not its node's, not the connection's expectedSources), by connection, role and the action taken (alert, revoke, record).",
		}, []string{"connection", "role", "action"}),
		neverUsed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "use_never_used_total",
			Help: "Credentials revoked without a session ever seen (while the issuer could see sessions), by connection and role.",
		}, []string{"connection", "role"}),
		unused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "use_unused_total",
			Help: "Credentials still unused when their role's unusedAfter passed, by connection and role.",
		}, []string{"connection", "role"}),
		blind: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: namespace, Name: "use_sampling_blind",
			Help: "1 while the issuer cannot see the sessions of the roles it minted on a connection (its admin lacks pg_read_all_stats, or sampling fails).",
		}, []string{"connection"}),
		sample: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "use_sample_duration_seconds",
			Help:    "Time one sample of a connection's sessions took (one query).",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14),
		}, []string{"connection"}),
	}
	reg.MustRegister(u.sessions, u.first, u.foreign, u.neverUsed, u.unused, u.blind, u.sample)
	return u
}

// Sessions counts n new sessions seen on conn.
func (u *Use) Sessions(conn string, n int) {
	if u == nil {
		return
	}
	u.sessions.WithLabelValues(conn).Add(float64(n))
}

// FirstUse counts a credential's first use on conn.
func (u *Use) FirstUse(conn string) {
	if u == nil {
		return
	}
	u.first.WithLabelValues(conn).Inc()
}

// Foreign counts a foreign use of a credential of conn's role, and the
// action taken.
func (u *Use) Foreign(conn, role, action string) {
	if u == nil {
		return
	}
	u.foreign.WithLabelValues(conn, role, action).Inc()
}

// NeverUsed counts a credential of conn's role revoked without a use.
func (u *Use) NeverUsed(conn, role string) {
	if u == nil {
		return
	}
	u.neverUsed.WithLabelValues(conn, role).Inc()
}

// Unused counts a credential of conn's role whose unusedAfter passed
// without a use.
func (u *Use) Unused(conn, role string) {
	if u == nil {
		return
	}
	u.unused.WithLabelValues(conn, role).Inc()
}

// Blind sets whether the sampler cannot see conn's sessions.
func (u *Use) Blind(conn string, blind bool) {
	if u == nil {
		return
	}
	v := 0.0
	if blind {
		v = 1
	}
	u.blind.WithLabelValues(conn).Set(v)
}

// Sampled records the time one sample of conn took.
func (u *Use) Sampled(conn string, d time.Duration) {
	if u == nil {
		return
	}
	u.sample.WithLabelValues(conn).Observe(d.Seconds())
}

// Use is the use sampler's collectors of the driver's in-process issuer.
func (m *Metrics) Use() *Use {
	if m == nil {
		return nil
	}
	return m.use
}

// Use is the use sampler's collectors of the cluster issuer.
func (m *Issuer) Use() *Use { return m.use }
