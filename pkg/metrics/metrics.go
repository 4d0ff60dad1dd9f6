// Package metrics exposes the driver's Prometheus metrics and health
// endpoints. Labels are provider names, operations, outcomes and gRPC
// methods and codes: never a pod, a lease or anything secret.
//
// It imports none of our packages: every other one may count through it.
package metrics

import (
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

const namespace = "ephemeral_secrets"

// Operations counted by LeaseOp.
const (
	OpIssue  = "issue"
	OpRenew  = "renew"
	OpRotate = "rotate"
	OpRevoke = "revoke"
	OpExpire = "expire"
	// OpRecord is a failed write of the credential's record to the
	// cluster's inventory (the node's Records; only errors are counted).
	OpRecord = "record"
)

// Outcomes counted by LeaseOp (revocations also report the audit
// outcomes pending and unrevocable).
const (
	Success = "success"
	Error   = "error"
)

// State is what the lease manager reports at each scrape.
type State struct {
	LiveLeases map[string]int // by provider
	// RevocationQueue is the number of revocations not yet confirmed, and
	// OldestRevocation the age of the oldest.
	RevocationQueue  int
	OldestRevocation time.Duration
	// RenewalFailing counts live leases whose last renewal failed.
	RenewalFailing int
	// SoonestExpiry is the time left on the live lease closest to expiry
	// (0 with no live lease).
	SoonestExpiry time.Duration
}

// Metrics holds the driver's collectors. A nil *Metrics records nothing.
type Metrics struct {
	reg          *prometheus.Registry
	rpc          *prometheus.HistogramVec
	leaseOps     *prometheus.CounterVec
	saIssues     *prometheus.CounterVec // issues.go
	authFailures *prometheus.CounterVec
	kubeRequests *prometheus.CounterVec
	firstSeen    *prometheus.CounterVec
	refusals     *prometheus.CounterVec
	configGen    prometheus.Gauge
	configErrors prometheus.Counter
	reaper       *reaper
	use          *Use
	leaseAPI     *prometheus.CounterVec
	lockHeld     prometheus.Gauge // health.go
}

// New returns Metrics whose gauges are read from state at each scrape.
func New(state func() State) *Metrics {
	m := &Metrics{
		reg: prometheus.NewRegistry(),
		rpc: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "csi_operation_duration_seconds",
			Help:    "Duration of CSI calls by method and gRPC code (NodePublishVolume, NodeUnpublishVolume, ...).",
			Buckets: []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30},
		}, []string{"method", "code"}),
		leaseOps: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "lease_operations_total",
			Help: "Lease operations by provider, operation (issue, renew, rotate, revoke, expire) and outcome.",
		}, []string{"provider", "operation", "outcome"}),
		authFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "authorization_failures_total",
			Help: "Publishes refused because the pod's identity may not have what it asked for.",
		}, []string{"provider"}),
		kubeRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "kubernetes_api_requests_total",
			Help: "Requests the driver made to the Kubernetes API, by HTTP method and status code.",
		}, []string{"method", "code"}),
	}
	m.firstSeen = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Name: "first_seen_requests_total",
		Help: "Requests from a namespace/service account for a class it never asked for on this node before.",
	}, []string{"namespace"})
	m.refusals = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Name: "publish_refusals_total",
		Help: "New publishes refused by the admin's limits, by namespace and limit (namespace_leases, node_leases, publish_rate).",
	}, []string{"namespace", "limit"})
	m.configGen = prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: namespace, Name: "backend_config_generation",
		Help: "Backend configurations loaded since start (1 after start; each good reload adds one).",
	})
	m.configErrors = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: namespace, Name: "backend_config_reload_errors_total",
		Help: "Changed backend configurations that failed to load (the previous one stays in use).",
	})
	m.leaseAPI = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Name: "lease_api_requests_total",
		Help: "Calls of volumes' lease sockets by namespace, endpoint and HTTP status (429 and 400: refused).",
	}, []string{"namespace", "endpoint", "code"})
	m.reg.MustRegister(m.leaseAPI)
	m.reaper = newReaper(m.reg)
	m.saIssues = newServiceAccountIssues(m.reg)
	m.use = newUse(m.reg)
	m.registerHealth()
	m.reg.MustRegister(m.rpc, m.leaseOps, m.authFailures, m.kubeRequests, m.firstSeen, m.refusals, m.configGen, m.configErrors,
		&stateCollector{state: state},
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// RPC records one CSI call.
func (m *Metrics) RPC(method, code string, d time.Duration) {
	if m == nil {
		return
	}
	m.rpc.WithLabelValues(method, code).Observe(d.Seconds())
}

// LeaseOp records one lease operation.
func (m *Metrics) LeaseOp(provider, op, outcome string) {
	if m == nil {
		return
	}
	m.leaseOps.WithLabelValues(provider, op, outcome).Inc()
}

// AuthFailure records a refused publish.
func (m *Metrics) AuthFailure(provider string) {
	if m == nil {
		return
	}
	m.authFailures.WithLabelValues(provider).Inc()
}

// FirstSeen records a first-seen request from namespace.
func (m *Metrics) FirstSeen(namespace string) {
	if m == nil {
		return
	}
	m.firstSeen.WithLabelValues(namespace).Inc()
}

// Refusal records a publish refused by one of the admin's limits.
func (m *Metrics) Refusal(namespace, limit string) {
	if m == nil {
		return
	}
	m.refusals.WithLabelValues(namespace, limit).Inc()
}

// BackendConfigLoaded records that generation gen of the backend
// configuration is in use.
func (m *Metrics) BackendConfigLoaded(gen int) {
	if m == nil {
		return
	}
	m.configGen.Set(float64(gen))
}

// BackendConfigReloadError records a changed backend configuration that
// failed to load.
func (m *Metrics) BackendConfigReloadError() {
	if m == nil {
		return
	}
	m.configErrors.Inc()
}

// Reaped records one pass of the issuer's reaper: roles dropped because
// they expired or because no record held them, and failures.
func (m *Metrics) Reaped(expired, untracked, failures int) {
	if m == nil {
		return
	}
	m.reaper.reaped(expired, untracked, failures)
}

// CountRequests wraps an HTTP transport so that every Kubernetes API
// request is counted (rest.Config.WrapTransport).
func (m *Metrics) CountRequests(rt http.RoundTripper) http.RoundTripper {
	if m == nil {
		return rt
	}
	return roundTripper(func(req *http.Request) (*http.Response, error) {
		resp, err := rt.RoundTrip(req)
		code := "error"
		if err == nil {
			code = strconv.Itoa(resp.StatusCode)
		}
		m.kubeRequests.WithLabelValues(req.Method, code).Inc()
		return resp, err
	})
}

type roundTripper func(*http.Request) (*http.Response, error)

func (f roundTripper) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

var (
	liveDesc    = prometheus.NewDesc(namespace+"_live_leases", "Leases alive on the node, by provider.", []string{"provider"}, nil)
	queueDesc   = prometheus.NewDesc(namespace+"_revocation_queue_depth", "Revocations queued and not yet confirmed by their backend.", nil, nil)
	oldestDesc  = prometheus.NewDesc(namespace+"_revocation_queue_oldest_seconds", "Age of the oldest queued revocation (0 when the queue is empty).", nil, nil)
	failingDesc = prometheus.NewDesc(namespace+"_renewal_failing_leases", "Live leases whose last renewal attempt failed.", nil, nil)
	soonestDesc = prometheus.NewDesc(namespace+"_soonest_lease_expiry_seconds", "Time left on the live lease closest to expiry (0 with none).", nil, nil)
	_stateDescs = []*prometheus.Desc{liveDesc, queueDesc, oldestDesc, failingDesc, soonestDesc}
)

type stateCollector struct{ state func() State }

func (c *stateCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range _stateDescs {
		ch <- d
	}
}

func (c *stateCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.state()
	for p, n := range s.LiveLeases {
		ch <- prometheus.MustNewConstMetric(liveDesc, prometheus.GaugeValue, float64(n), p)
	}
	ch <- prometheus.MustNewConstMetric(queueDesc, prometheus.GaugeValue, float64(s.RevocationQueue))
	ch <- prometheus.MustNewConstMetric(oldestDesc, prometheus.GaugeValue, s.OldestRevocation.Seconds())
	ch <- prometheus.MustNewConstMetric(failingDesc, prometheus.GaugeValue, float64(s.RenewalFailing))
	ch <- prometheus.MustNewConstMetric(soonestDesc, prometheus.GaugeValue, s.SoonestExpiry.Seconds())
}

// LeaseAPI records one call of a volume's lease socket.
func (m *Metrics) LeaseAPI(namespace, endpoint string, code int) {
	if m == nil {
		return
	}
	m.leaseAPI.WithLabelValues(namespace, endpoint, strconv.Itoa(code)).Inc()
}
