package metrics

import "github.com/prometheus/client_golang/prometheus"

// newServiceAccountIssues makes the counter of credentials issued for
// each service account (the issue-rate anomaly rules of the chart read
// it) and registers it with reg.
//
// Its labels are names the admin's classes already allowed (a namespace,
// a service account, a provider), never a pod, a lease or a secret: it
// is counted on success only, so a refused tenant adds no series.
func newServiceAccountIssues(reg prometheus.Registerer) *prometheus.CounterVec {
	c := prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Name: "service_account_issues_total",
		Help: "Credentials issued on this node for pods of a service account (a publish, a rotation, a task lease), by namespace, service account and provider. " +
			"One series per namespace, service account and provider that was issued a credential on this node since the node plugin started.",
	}, []string{"namespace", "service_account", "provider"})
	reg.MustRegister(c)
	return c
}

// Issued counts one credential issued by provider for a pod of
// serviceAccount in namespace: a publish's, a rotation's or a task
// lease's.
func (m *Metrics) Issued(namespace, serviceAccount, provider string) {
	if m == nil {
		return
	}
	m.saIssues.WithLabelValues(namespace, serviceAccount, provider).Inc()
}
