package chart

import (
	"fmt"
	"maps"
	"regexp"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// jobsInRules are the jobs the alerts select up by.
var jobsInRules = regexp.MustCompile(`up\{job="([^"]+)"\}`)

// The issuer is scraped like the node plugins: a metrics Service that
// selects its pods on their metrics port, a ServiceMonitor of its own;
// each ServiceMonitor gives its targets the job the alerts name, and
// every job an alert names is one of them.
func TestIssuerIsScraped(t *testing.T) {
	objs := render(t, "--set", "monitoring.enabled=true,providers.postgres.enabled=true,monitoring.serviceMonitor.labels.release=kps,monitoring.serviceMonitor.interval=15s")
	svc := into[corev1.Service](t, objs, "Service/ephemeral-secrets-csi-issuer-metrics")
	dep := into[appsv1.Deployment](t, objs, "Deployment/ephemeral-secrets-csi-issuer")
	if !matches(svc.Spec.Selector, dep.Spec.Template.Labels) || matches(svc.Spec.Selector, map[string]string{"app.kubernetes.io/component": "node"}) {
		t.Errorf("issuer metrics Service selects %v; issuer pods are %v", svc.Spec.Selector, dep.Spec.Template.Labels)
	}
	var port int32
	for _, p := range dep.Spec.Template.Spec.Containers[0].Ports {
		if p.Name == "metrics" {
			port = p.ContainerPort
		}
	}
	if len(svc.Spec.Ports) != 1 || svc.Spec.Ports[0].Name != "metrics" || svc.Spec.Ports[0].TargetPort.String() != "metrics" || port == 0 {
		t.Errorf("issuer metrics Service ports %+v, container port %d", svc.Spec.Ports, port)
	}

	jobs := map[string]string{} // job by component
	for _, name := range []string{"ephemeral-secrets-csi", "ephemeral-secrets-csi-issuer"} {
		sm := objs["ServiceMonitor/"+name]
		if sm == nil {
			t.Fatalf("no ServiceMonitor %s; have %v", name, keysOf(objs))
		}
		if sm.GetLabels()["release"] != "kps" {
			t.Errorf("%s: labels %v lack monitoring.serviceMonitor.labels", name, sm.GetLabels())
		}
		sel, _, _ := unstructured.NestedStringMap(sm.Object, "spec", "selector", "matchLabels")
		component := sel["app.kubernetes.io/component"]
		eps, _, _ := unstructured.NestedSlice(sm.Object, "spec", "endpoints")
		ep := eps[0].(map[string]any)
		if ep["port"] != "metrics" || ep["interval"] != "15s" {
			t.Errorf("%s: endpoint %v", name, ep)
		}
		rls, _, _ := unstructured.NestedSlice(ep, "relabelings")
		for _, r := range rls {
			r := r.(map[string]any)
			if r["targetLabel"] == "job" {
				jobs[component] = fmt.Sprint(r["replacement"])
			}
		}
	}
	if jobs["node"] == "" || jobs["issuer"] == "" || jobs["node"] == jobs["issuer"] {
		t.Fatalf("jobs by component %v", jobs)
	}
	rules := alertRules(t, objs)
	named := map[string]bool{}
	for _, r := range rules {
		for _, m := range jobsInRules.FindAllStringSubmatch(fmt.Sprint(r["expr"]), -1) {
			named[m[1]] = true
		}
	}
	if want := []string{jobs["node"], jobs["issuer"]}; !slices.Equal(slices.Sorted(maps.Keys(named)), slices.Sorted(slices.Values(want))) {
		t.Errorf("the alerts name jobs %v; the ServiceMonitors give %v", slices.Sorted(maps.Keys(named)), want)
	}
}

// Without the issuer, neither its Service, its ServiceMonitor nor its
// alerts (which would say it is down) are rendered; the cluster-wide
// alerts, which read the in-process reaper too, are.
func TestNoIssuerNoIssuerMonitoring(t *testing.T) {
	// Without PostgreSQL (the default profile), and with PostgreSQL held
	// by the nodes.
	for _, set := range []string{"monitoring.enabled=true", "monitoring.enabled=true,providers.postgres.enabled=true,issuer.enabled=false"} {
		t.Run(set, func(t *testing.T) { noIssuerMonitoring(t, render(t, "--set", set)) })
	}
}

func noIssuerMonitoring(t *testing.T, objs objects) {
	for _, k := range []string{"Service/ephemeral-secrets-csi-issuer-metrics", "ServiceMonitor/ephemeral-secrets-csi-issuer"} {
		if objs[k] != nil {
			t.Errorf("%s rendered without the issuer", k)
		}
	}
	names := map[string]bool{}
	for _, r := range alertRules(t, objs) {
		names[fmt.Sprint(r["alert"])] = true
		if strings.Contains(fmt.Sprint(r["expr"]), "issuer_requests") || strings.Contains(fmt.Sprint(r["expr"]), "issuer_leader") {
			t.Errorf("%v about the issuer rendered without it", r["alert"])
		}
	}
	// A use elsewhere is counted by an in-process issuer too.
	if !names["EphemeralSecretsReapFailing"] || !names["EphemeralSecretsDriverAbsent"] || names["EphemeralSecretsIssuerDown"] ||
		!names["EphemeralSecretsCredentialUsedElsewhere"] {
		t.Errorf("alerts without the issuer: %v", slices.Sorted(maps.Keys(names)))
	}
}

// alertRules are the rules of every group of the PrometheusRule.
func alertRules(t *testing.T, objs objects) []map[string]any {
	t.Helper()
	groups, _, _ := unstructured.NestedSlice(objs["PrometheusRule/ephemeral-secrets-csi"].Object, "spec", "groups")
	var out []map[string]any
	for _, g := range groups {
		for _, r := range g.(map[string]any)["rules"].([]any) {
			out = append(out, r.(map[string]any))
		}
	}
	if len(out) == 0 {
		t.Fatal("no alerts")
	}
	return out
}

// matches reports whether selector selects labels.
func matches(selector, labels map[string]string) bool {
	for k, v := range selector {
		if labels[k] != v {
			return false
		}
	}
	return len(selector) > 0
}
