package chart

import (
	"slices"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	rbacv1 "k8s.io/api/rbac/v1"
)

// What the issuer's use observation needs of the chart: its interval on
// the command line (default 1s), the rights to read a pod's IPs and its
// node's addresses (the expected sources) and to warn the pod (events);
// the recording rules of the PrometheusRule keep their series' labels
// (monitoring.prometheusRule.alertLabels are for alerts).
func TestIssuerObservesUse(t *testing.T) {
	objs := render(t, "--set", "providers.postgres.enabled=true,monitoring.enabled=true,monitoring.prometheusRule.alertLabels.team=db")
	dep := into[appsv1.Deployment](t, objs, "Deployment/ephemeral-secrets-csi-issuer")
	if args := dep.Spec.Template.Spec.Containers[0].Args; !slices.Contains(args, "--use-interval=1s") {
		t.Errorf("issuer args %v lack --use-interval=1s (issuer.useInterval's default)", args)
	}
	role := into[rbacv1.ClusterRole](t, objs, "ClusterRole/ephemeral-secrets-csi-issuer")
	for _, want := range []struct{ resource, verb string }{{"pods", "get"}, {"nodes", "get"}, {"events", "create"}} {
		if !slices.ContainsFunc(role.Rules, func(r rbacv1.PolicyRule) bool {
			return slices.Equal(r.APIGroups, []string{""}) && slices.Contains(r.Resources, want.resource) && slices.Contains(r.Verbs, want.verb)
		}) {
			t.Errorf("the issuer's ClusterRole %v does not %s %s", role.Rules, want.verb, want.resource)
		}
	}
	alerts, records := 0, 0
	for _, r := range alertRules(t, objs) {
		labels, _ := r["labels"].(map[string]any)
		switch {
		case r["record"] != nil:
			records++
			if labels["team"] != nil {
				t.Errorf("recording rule %v has the alerts' labels %v", r["record"], labels)
			}
		case labels["team"] != "db":
			t.Errorf("alert %v lacks monitoring.prometheusRule.alertLabels: %v", r["alert"], labels)
		default:
			alerts++
		}
	}
	if records != 2 || alerts == 0 {
		t.Errorf("%d recording rules (want the issue rate and its 1-day average), %d alerts", records, alerts)
	}
}
