package lease

import (
	"context"
	"maps"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/ephemeral-secrets/csi-driver/pkg/metrics"
	"github.com/ephemeral-secrets/csi-driver/pkg/spc"
)

func TestServiceAccountIssues(t *testing.T) { inTiers(t, time.Hour, testServiceAccountIssues) }

// Every credential issued for a pod counts once for the pod's namespace,
// service account and provider, as the node's /metrics serves it: a
// publish, a task lease, a rotation; a refused publish counts nothing.
func testServiceAccountIssues(t *testing.T, n *node) {
	ctx := context.Background()
	met := metrics.New(func() metrics.State { return metrics.State{} })
	m := n.manager(n.store, n.prov, Options{Metrics: met})
	defer m.Close()
	if err := m.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	prov := n.classes[testNS+"/db"].Provider
	want := map[string]float64{}
	check := func(step string) {
		t.Helper()
		if got := saIssues(t, met, prov); !maps.Equal(got, want) {
			t.Errorf("after %s: issues by service account %v, want %v", step, got, want)
		}
	}

	v := n.volume("sa1")
	v.Attributes[spc.ClassKey], v.Mount.Class = "db-tasks", "db-tasks"
	publish(t, m, v)
	want["app"] = 1
	check("a publish")

	if _, err := m.IssueTask(ctx, v.ID, "a", 0); err != nil {
		t.Fatal(err)
	}
	want["app"]++
	check("a task lease")

	if _, err := m.RotateNow(ctx, v.ID); err != nil {
		t.Fatal(err)
	}
	want["app"]++
	check("a rotation")

	other := n.volume("sa2")
	other.Mount.Pod.ServiceAccount = "reports"
	publish(t, m, other)
	want["reports"] = 1
	check("another service account's publish")

	refused := n.volume("sa3")
	refused.Attributes[spc.ClassKey], refused.Mount.Class = "nope", "nope"
	refused.Mount.Pod.ServiceAccount = "intruder"
	if err := m.Publish(ctx, refused); err == nil {
		t.Fatal("a publish of an unknown class succeeded")
	}
	check("a refused publish")
}

// saIssues reads ephemeral_secrets_service_account_issues_total of the
// test namespace and provider prov from met's /metrics, by service
// account.
func saIssues(t *testing.T, met *metrics.Metrics, prov string) map[string]float64 {
	t.Helper()
	rec := httptest.NewRecorder()
	met.Handler(metrics.Health{}).ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(rec.Body)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]float64{}
	fam, ok := fams["ephemeral_secrets_service_account_issues_total"]
	if !ok {
		return out
	}
	for _, s := range fam.GetMetric() {
		labels := map[string]string{}
		for _, l := range s.GetLabel() {
			labels[l.GetName()] = l.GetValue()
		}
		if labels["namespace"] != testNS || labels["provider"] != prov {
			t.Errorf("a series of another namespace or provider: %v", labels)
			continue
		}
		out[labels["service_account"]] = s.GetCounter().GetValue()
	}
	return out
}
