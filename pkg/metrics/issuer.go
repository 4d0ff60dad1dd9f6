package metrics

import (
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Revoking is what the issuer reports at each scrape about the inventory's
// records being deleted that still wait for their credential's
// revocation, by who revokes: the issuer (the engines it hosts) or the
// record's node plugin (Vault, AWS).
type Revoking struct {
	Issuer, Node Backlog
}

// Backlog is a number of records being revoked and the age of the oldest
// (how long ago its deletion was asked for; 0 with none).
type Backlog struct {
	Count  int
	Oldest time.Duration
}

// IssuerOptions shape the cluster issuer's metrics.
type IssuerOptions struct {
	// Revoking, when set, is read at each scrape (the inventory's cache).
	Revoking func() Revoking
}

// Issuer holds the collectors of the cluster issuer ("ephemeral-secrets-csi
// issuer"). Labels are verbs, answer codes, outcomes and reasons: never a
// pod, a role or a namespace.
type Issuer struct {
	reg         *prometheus.Registry
	requests    *prometheus.CounterVec
	duration    *prometheus.HistogramVec
	leader      prometheus.Gauge
	revocations *prometheus.CounterVec
	reaper      *reaper
	use         *Use
}

// NewIssuer returns the issuer's metrics.
func NewIssuer(o IssuerOptions) *Issuer {
	m := &Issuer{
		reg: prometheus.NewRegistry(),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: namespace, Name: "issuer_requests_total",
			Help: "Node plugins' requests to the issuer, by verb (mint, extend, drop) and answer code (OK, Unavailable, PermissionDenied, ..., Internal)."}, []string{"verb", "code"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: namespace, Name: "issuer_request_duration_seconds",
			Help: "Time the issuer took to answer, by verb.", Buckets: prometheus.ExponentialBuckets(0.001, 2, 15)}, []string{"verb"}),
		leader: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: namespace, Name: "issuer_leader",
			Help: "1 while this replica leads (reaps and runs the inventory controller)."}),
		revocations: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: namespace, Name: "inventory_revocations_total",
			Help: "Revocations by the leader's inventory controller of the credentials of deleted records (the Pod's deletion, the kill switch), by outcome (success, error: retried)."},
			[]string{"outcome"}),
	}
	m.revocations.WithLabelValues(Success)
	m.revocations.WithLabelValues(Error)
	m.reaper = newReaper(m.reg)
	m.use = newUse(m.reg)
	m.reg.MustRegister(m.requests, m.duration, m.leader, m.revocations,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if o.Revoking != nil {
		m.reg.MustRegister(&revokingCollector{state: o.Revoking})
	}
	return m
}

// Request records one answer to a node plugin (remote.ServerOptions.Observe).
func (m *Issuer) Request(verb, code string, d time.Duration) {
	m.requests.WithLabelValues(verb, code).Inc()
	m.duration.WithLabelValues(verb).Observe(d.Seconds())
}

// Leading records whether this replica leads.
func (m *Issuer) Leading(yes bool) {
	v := 0.0
	if yes {
		v = 1
	}
	m.leader.Set(v)
}

// InventoryRevocation records one revocation by the inventory controller.
func (m *Issuer) InventoryRevocation(err error) {
	outcome := Success
	if err != nil {
		outcome = Error
	}
	m.revocations.WithLabelValues(outcome).Inc()
}

// Reaped records one pass of the reaper (as Metrics.Reaped).
func (m *Issuer) Reaped(expired, untracked, failures int) {
	m.reaper.reaped(expired, untracked, failures)
}

// Handler serves /metrics, /healthz (the process answers) and /readyz
// (ready() is true: the issuer has its serving certificate).
func (m *Issuer) Handler(ready func() bool) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok\n")) })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !ready() {
			http.Error(w, "no serving certificate yet", http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ok\n"))
	})
	return mux
}

// The revoker label's values: who revokes a record's credential.
const (
	RevokerIssuer = "issuer"
	RevokerNode   = "node"
)

var (
	revokingCountDesc = prometheus.NewDesc(namespace+"_inventory_revoking_credentials",
		"Credential records being deleted whose credential is not revoked yet (state Revoking), by who revokes it (issuer: PostgreSQL; node: the node plugin, Vault and AWS).",
		[]string{"revoker"}, nil)
	revokingOldestDesc = prometheus.NewDesc(namespace+"_inventory_revoking_oldest_seconds",
		"Time since the deletion of the oldest Credential record still waiting for its revocation, by who revokes it (0 with none).",
		[]string{"revoker"}, nil)
)

type revokingCollector struct{ state func() Revoking }

func (c *revokingCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- revokingCountDesc
	ch <- revokingOldestDesc
}

func (c *revokingCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.state()
	for _, b := range []struct {
		revoker string
		Backlog
	}{{RevokerIssuer, s.Issuer}, {RevokerNode, s.Node}} {
		ch <- prometheus.MustNewConstMetric(revokingCountDesc, prometheus.GaugeValue, float64(b.Count), b.revoker)
		ch <- prometheus.MustNewConstMetric(revokingOldestDesc, prometheus.GaugeValue, b.Oldest.Seconds(), b.revoker)
	}
}
