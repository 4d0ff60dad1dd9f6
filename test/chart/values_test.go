package chart

import (
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/yaml"
)

// Every value set in testdata/every-value.yaml reaches the objects.
func TestEveryValueReachesTheObjects(t *testing.T) {
	objs := render(t, "-f", "testdata/every-value.yaml")
	ds := into[appsv1.DaemonSet](t, objs, "DaemonSet/secrets-csi")
	spec := ds.Spec.Template.Spec
	driver := container(t, ds, "driver")
	errorf := func(what string, got, want any) {
		t.Helper()
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("%s: got %v, want %v", what, got, want)
		}
	}

	// Names, labels, annotations.
	errorf("selector name", ds.Spec.Selector.MatchLabels["app.kubernetes.io/name"], "esc")
	errorf("commonLabels", ds.Labels["team"], "platform")
	errorf("daemonSetLabels", ds.Labels["ds-label"], "yes")
	errorf("daemonSetAnnotations", ds.Annotations["ds-annotation"], "yes")
	errorf("podLabels", ds.Spec.Template.Labels["pod-label"], "yes")
	errorf("podAnnotations", ds.Spec.Template.Annotations["pod-annotation"], "yes")
	if _, ok := ds.Spec.Selector.MatchLabels["pod-label"]; ok {
		t.Error("podLabels reached the immutable selector")
	}
	errorf("serviceAccountName", spec.ServiceAccountName, "secrets-csi")

	// Images.
	errorf("driver image (digest wins over the tag)", driver.Image,
		"registry.example.com/mirror/csi-driver@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
	errorf("driver pullPolicy", driver.ImagePullPolicy, corev1.PullAlways)
	errorf("imagePullSecrets", spec.ImagePullSecrets, []corev1.LocalObjectReference{{Name: "mirror-pull"}})

	// Scheduling.
	errorf("nodeSelector", spec.NodeSelector, map[string]string{"kubernetes.io/os": "linux", "node-role.example.com/workers": "true"})
	if a := spec.Affinity; a == nil || a.NodeAffinity == nil || a.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution.NodeSelectorTerms[0].MatchExpressions[0].Values[0] != "virtual-kubelet" {
		t.Errorf("affinity %+v", spec.Affinity)
	}
	errorf("tolerations", spec.Tolerations, []corev1.Toleration{{Key: "dedicated", Operator: "Equal", Value: "secrets", Effect: "NoSchedule"}})
	errorf("priorityClassName", spec.PriorityClassName, "system-cluster-critical")
	errorf("terminationGracePeriodSeconds", *spec.TerminationGracePeriodSeconds, 45)
	errorf("updateStrategy", ds.Spec.UpdateStrategy.RollingUpdate.MaxUnavailable.String(), "10%")

	// The driver's flags, log level, args, env, mounts, resources, probes.
	for _, a := range []string{
		"--kubelet-dir=/data/kubelet", "--state-dir=/run/esc-state",
		"--backend-config=/etc/ephemeral-secrets/backends/config.yaml",
		"--audit-log=/var/log/esc/audit.jsonl", "--metrics-address=:9900", "-v=4",
		"--max-volume-bytes=2097152", "--renew-fraction=0.5", "--retry-min=2s", "--retry-max=2m",
		"--backend-timeout=10s", "--backend-reload-interval=30s", "--sweep-interval=30s", "--rotation-grace=2s",
		"--max-leases-per-namespace=20", "--max-leases-per-node=200", "--publish-rate-per-namespace=0.5", "--publish-burst-per-namespace=5", "--classes-file=/etc/classes/classes.yaml",
	} {
		if !slices.Contains(driver.Args, a) {
			t.Errorf("driver args %v lack %s", driver.Args, a)
		}
	}
	if !slices.ContainsFunc(driver.Env, func(e corev1.EnvVar) bool { return e.Name == "GODEBUG" && e.Value == "madvdontneed=1" }) {
		t.Errorf("extraEnv missing: %v", driver.Env)
	}
	errorf("driver memory limit", driver.Resources.Limits.Memory(), "256Mi")
	errorf("driver cpu request", driver.Resources.Requests.Cpu(), "20m")
	errorf("metrics port", driver.Ports[0].ContainerPort, 9900)
	lp := driver.LivenessProbe
	errorf("liveness probe", []int32{lp.PeriodSeconds, lp.TimeoutSeconds, lp.FailureThreshold, lp.InitialDelaySeconds}, []int32{11, 4, 7, 1})
	rp := driver.ReadinessProbe
	errorf("readiness probe", []int32{rp.PeriodSeconds, rp.TimeoutSeconds, rp.FailureThreshold}, []int32{6, 2, 4})
	mounts := map[string]string{}
	for _, m := range driver.VolumeMounts {
		mounts[m.Name] = m.MountPath
	}
	errorf("pods mount", mounts["pods-dir"], "/data/kubelet/pods")
	errorf("state mount", mounts["state-dir"], "/run/esc-state")
	errorf("audit mount (the log file's directory)", mounts["audit-dir"], "/var/log/esc")
	errorf("extraVolumeMounts", mounts["classes"], "/etc/classes")

	// Volumes.
	errorf("hostPaths", hostPaths(ds), map[string]string{
		"plugin-dir": "/data/kubelet/plugins/ephemeral-secrets.csi.dev", "registration-dir": "/data/kubelet/plugins_registry",
		"pods-dir": "/data/kubelet/pods", "state-dir": "/run/esc-state", "audit-dir": "/var/log/esc-audit",
	})
	var secretName string
	var extra bool
	for _, v := range spec.Volumes {
		if v.Secret != nil {
			secretName = v.Secret.SecretName
		}
		if v.Name == "classes" && v.ConfigMap != nil && v.ConfigMap.Name == "classes" {
			extra = true
		}
	}
	errorf("backends secret", secretName, "my-backends")
	errorf("extraVolumes", extra, true)

	checkRegistration(t, ds, driver, "/data/kubelet")
	checkSecurity(t, ds)

	// Tokens: one audience per enabled provider and the extra ones, in
	// secrets (forced "true" here).
	csi := into[storagev1.CSIDriver](t, objs, "CSIDriver/ephemeral-secrets.csi.dev")
	var auds []string
	for _, r := range csi.Spec.TokenRequests {
		auds = append(auds, r.Audience)
		errorf("token lifetime", *r.ExpirationSeconds, 1200)
	}
	errorf("audiences", auds, []string{"vault-prod", "sts.example.com", "https://iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/k", "custom-audience"})
	if p := csi.Spec.ServiceAccountTokenInSecrets; p == nil || !*p {
		t.Error("serviceAccountTokenInSecrets not set")
	}
	if !slices.Contains(driver.Args, "--tokens-in-secrets=true") {
		t.Errorf("driver args %v lack --tokens-in-secrets=true", driver.Args)
	}
	// priorityClassQuota.enabled=false: no quota for the system-* class.
	if _, ok := objs["ResourceQuota/secrets-csi-critical-pods"]; ok {
		t.Error("ResourceQuota rendered with priorityClassQuota.enabled=false")
	}

	// aggregateRoles: false.
	if _, ok := objs["ClusterRole/secrets-csi-edit"]; ok {
		t.Error("aggregated roles rendered with aggregateRoles=false")
	}

	// Monitoring.
	sm := objs["ServiceMonitor/secrets-csi"]
	if sm == nil {
		t.Fatalf("no ServiceMonitor: %v", keysOf(objs))
	}
	errorf("ServiceMonitor labels", sm.GetLabels()["release"], "kube-prometheus-stack")
	eps, _, _ := unstructured.NestedSlice(sm.Object, "spec", "endpoints")
	ep := eps[0].(map[string]any)
	errorf("interval", ep["interval"], "15s")
	errorf("scrapeTimeout", ep["scrapeTimeout"], "10s")
	relabel := fmt.Sprint(ep["relabelings"])
	for _, want := range []string{"__meta_kubernetes_pod_node_name", "targetLabel:node", "targetLabel:cluster", "replacement:prod-eu"} {
		if !strings.Contains(relabel, want) {
			t.Errorf("relabelings %s lack %s", relabel, want)
		}
	}
	pr := objs["PrometheusRule/secrets-csi"]
	errorf("PrometheusRule labels", pr.GetLabels()["release"], "kube-prometheus-stack")
	groups, _, _ := unstructured.NestedSlice(pr.Object, "spec", "groups")
	rules := groups[0].(map[string]any)["rules"].([]any)
	for _, r := range rules {
		r := r.(map[string]any)
		labels := r["labels"].(map[string]any)
		errorf(fmt.Sprint(r["alert"], " team label"), labels["team"], "platform")
		if labels["severity"] == nil {
			t.Errorf("%v lost its severity", r["alert"])
		}
	}
	cm := objs["ConfigMap/secrets-csi-dashboard"]
	errorf("dashboard labels", cm.GetLabels()["grafana_folder"], "secrets")
	svc := into[corev1.Service](t, objs, "Service/secrets-csi-metrics")
	errorf("service port", svc.Spec.Ports[0].Port, 9900)
	errorf("service selector", svc.Spec.Selector, ds.Spec.Selector.MatchLabels)

	checkIssuerValues(t, objs, &driver)
	checkHousekeeperValues(t, objs, &driver)
}

// checkHousekeeperValues checks the housekeeper and uninstall values of
// testdata/every-value.yaml.
func checkHousekeeperValues(t *testing.T, objs objects, driver *corev1.Container) {
	t.Helper()
	dep := into[appsv1.Deployment](t, objs, "Deployment/secrets-csi-housekeeper")
	spec := dep.Spec.Template.Spec
	c := spec.Containers[0]
	errorf := func(what string, got, want any) {
		t.Helper()
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("housekeeper %s: got %v, want %v", what, got, want)
		}
	}
	errorf("image (the driver's)", c.Image, driver.Image)
	for _, a := range []string{"housekeeper", "--handover-after=30s", "--metrics-address=:9913", "-v=2", "--pod-check-interval=1m",
		"--issuer-lease=ephemeral-secrets/secrets-csi-issuer"} {
		if !slices.Contains(c.Args, a) {
			t.Errorf("housekeeper args %v lack %s", c.Args, a)
		}
	}
	errorf("memory limit", c.Resources.Limits.Memory(), "80Mi")
	errorf("priorityClassName", spec.PriorityClassName, "housekeeper-critical")
	errorf("nodeSelector", spec.NodeSelector, map[string]string{"kubernetes.io/os": "linux", "node-role.example.com/infra": "true"})
	errorf("tolerations", spec.Tolerations, []corev1.Toleration{{Key: "infra", Operator: "Exists", Effect: "NoSchedule"}})
	errorf("volumes (none: no Secret)", len(spec.Volumes), 0)
	job := into[batchv1.Job](t, objs, "Job/secrets-csi-uninstall")
	jc := job.Spec.Template.Spec.Containers[0]
	for _, a := range []string{"uninstall", "--wait-for-pods=3m", "--wait-for-records=30s"} {
		if !slices.Contains(jc.Args, a) {
			t.Errorf("uninstall hook args %v lack %s", jc.Args, a)
		}
	}
	errorf("uninstall hook", job.Annotations["helm.sh/hook"], "pre-delete")
}

// checkIssuerValues checks the issuer values of testdata/every-value.yaml.
func checkIssuerValues(t *testing.T, objs objects, driver *corev1.Container) {
	t.Helper()
	dep := into[appsv1.Deployment](t, objs, "Deployment/secrets-csi-issuer")
	spec := dep.Spec.Template.Spec
	c := spec.Containers[0]
	errorf := func(what string, got, want any) {
		t.Helper()
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("issuer %s: got %v, want %v", what, got, want)
		}
	}
	errorf("replicas", *dep.Spec.Replicas, 3)
	errorf("image (the driver's)", c.Image, driver.Image)
	for _, a := range []string{
		"--backend-config=/etc/ephemeral-secrets/issuer/pg.yaml", "--reap-interval=10s", "--use-interval=250ms", "--cluster-domain=example.internal",
		"--listen-address=:9443", "--metrics-address=:9912", "-v=3", "--token-review-cache=5s",
		"--service-name=secrets-csi-issuer", "--driver-service-account=secrets-csi",
	} {
		if !slices.Contains(c.Args, a) {
			t.Errorf("issuer args %v lack %s", c.Args, a)
		}
	}
	errorf("memory limit", c.Resources.Limits.Memory(), "512Mi")
	errorf("cpu request", c.Resources.Requests.Cpu(), "50m")
	errorf("priorityClassName", spec.PriorityClassName, "issuer-critical")
	errorf("nodeSelector", spec.NodeSelector, map[string]string{"kubernetes.io/os": "linux", "node-role.example.com/infra": "true"})
	if a := spec.Affinity; a == nil || a.NodeAffinity == nil || a.PodAntiAffinity != nil {
		t.Errorf("issuer affinity %+v: want the given one instead of the default", a)
	}
	errorf("tolerations", spec.Tolerations, []corev1.Toleration{{Key: "infra", Operator: "Exists", Effect: "NoSchedule"}})
	var secret string
	for _, v := range spec.Volumes {
		if v.Secret != nil {
			secret = v.Secret.SecretName
		}
	}
	errorf("backends secret", secret, "my-issuer-backends")
	svc := into[corev1.Service](t, objs, "Service/secrets-csi-issuer")
	errorf("service target", svc.Spec.Ports[0].TargetPort.String(), "https")
	errorf("container port", c.Ports[0].ContainerPort, 9443)
	if _, ok := objs["NetworkPolicy/secrets-csi-issuer"]; ok {
		t.Error("issuer.networkPolicy.enabled=false rendered the NetworkPolicy")
	}
	if !slices.Contains(driver.Args, "--issuer-address=https://secrets-csi-issuer.ephemeral-secrets.svc:443") {
		t.Errorf("driver args %v do not name the issuer's Service", driver.Args)
	}
}

// The alerts say which node, never which pod IP.
func TestAlertsNameTheNode(t *testing.T) {
	objs := render(t, "--set", "monitoring.enabled=true")
	groups, _, _ := unstructured.NestedSlice(objs["PrometheusRule/ephemeral-secrets-csi"].Object, "spec", "groups")
	rules := groups[0].(map[string]any)["rules"].([]any)
	if len(rules) == 0 {
		t.Fatal("no alerts")
	}
	for _, r := range rules {
		r := r.(map[string]any)
		expr := fmt.Sprint(r["expr"])
		summary := fmt.Sprint(r["annotations"].(map[string]any)["summary"])
		if !strings.Contains(expr, "by (node") || strings.Contains(expr, "instance") {
			t.Errorf("%v: expr %q does not aggregate by node", r["alert"], expr)
		}
		if !strings.Contains(summary, "{{ $labels.node }}") || strings.Contains(summary, "instance") {
			t.Errorf("%v: summary %q does not name the node", r["alert"], summary)
		}
	}
}

// A misspelled or unknown key fails helm template, at every level.
func TestSchemaRefusesUnknownKeys(t *testing.T) {
	for _, set := range []string{
		"drivr.logLevel=1",
		"driver.imag.tag=x",
		"driver.image.tga=x",
		"nodeSelectr.a=b",
		"monitoring.serviceMonitor.lables.release=x",
		"monitoring.prometheusRule.alertLabel.a=b",
		"providers.vaul.enabled=true",
		"driver.resources.limit.memory=1Gi",
		"updateStrategy.rollingUpdate.maxUnavaliable=1",
		"imagePullSecrets[0].nme=x",
		"csiDriver.serviceAccountTokenInSecret=true",
	} {
		t.Run(set, func(t *testing.T) {
			out, err := helm(t, "template", "esc", chartDir, "--kube-version", "1.35.0", "--set", set)
			if err == nil {
				t.Fatalf("helm template --set %s passed", set)
			}
			if !strings.Contains(out, "additional properties") && !strings.Contains(out, "additionalProperties") {
				t.Errorf("error does not name the unknown key: %s", out)
			}
		})
	}
	// And values of the wrong shape.
	for _, set := range []string{
		"driver.image.digest=latest",
		"driver.retryMin=5",
		"driver.renewFraction=1.5",
		"driver.image.pullPolicy=Sometimes",
		"tokenExpirationSeconds=60",
		"driver.auditLog.file=relative.log",
	} {
		t.Run(set, func(t *testing.T) {
			if out, err := helm(t, "template", "esc", chartDir, "--kube-version", "1.35.0", "--set", set); err == nil {
				t.Fatalf("helm template --set %s passed:\n%.300s", set, out)
			}
		})
	}
}

// Token delivery is one explicit value, csiDriver.tokensInSecrets,
// whatever Kubernetes version helm assumes (an offline render, helm
// template or GitOps, must agree with the cluster): the CSIDriver's
// serviceAccountTokenInSecrets and the driver's --tokens-in-secrets follow
// it; its default, false, is right for the oldest Kubernetes the chart
// claims (1.30: the field exists from 1.35). With no token requested the
// field is absent (1.35 refuses it without tokenRequests) and the driver
// refuses any token a pod puts in its volume attributes.
func TestTokensInSecretsIsAnExplicitValue(t *testing.T) {
	for _, tc := range []struct {
		name      string
		args      []string
		audiences []string
		inSecrets bool // the CSIDriver's field
		flag      bool // the driver's --tokens-in-secrets
	}{
		{"default on 1.30", []string{"--kube-version", "1.30.0", "--set", "providers.vault.enabled=true"}, []string{"vault"}, false, false},
		{"default on 1.37", []string{"--kube-version", "1.37.2", "--set", "providers.vault.enabled=true"}, []string{"vault"}, false, false},
		{"set on 1.35", []string{"--kube-version", "1.35.0", "--set", "providers.aws.enabled=true,csiDriver.tokensInSecrets=true"}, []string{"sts.amazonaws.com"}, true, true},
		{"gcp", []string{"--kube-version", "1.37.2", "--set", "providers.gcp.enabled=true,providers.gcp.tokenAudience=https://iam.googleapis.com/x"}, []string{"https://iam.googleapis.com/x"}, false, false},
		{"gcp's audience without gcp", []string{"--kube-version", "1.37.2", "--set", "providers.gcp.tokenAudience=https://iam.googleapis.com/x"}, nil, false, true},
		{"no token", []string{"--kube-version", "1.37.2"}, nil, false, true},
		{"no token, set", []string{"--kube-version", "1.37.2", "--set", "csiDriver.tokensInSecrets=true"}, nil, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			objs := render(t, tc.args...)
			csi := into[storagev1.CSIDriver](t, objs, "CSIDriver/ephemeral-secrets.csi.dev")
			var auds []string
			for _, r := range csi.Spec.TokenRequests {
				auds = append(auds, r.Audience)
			}
			if !slices.Equal(auds, tc.audiences) {
				t.Errorf("audiences %v, want %v", auds, tc.audiences)
			}
			if got := csi.Spec.ServiceAccountTokenInSecrets != nil && *csi.Spec.ServiceAccountTokenInSecrets; got != tc.inSecrets {
				t.Errorf("serviceAccountTokenInSecrets %v, want %v", got, tc.inSecrets)
			}
			ds := into[appsv1.DaemonSet](t, objs, "DaemonSet/ephemeral-secrets-csi")
			if want, args := fmt.Sprintf("--tokens-in-secrets=%v", tc.flag), container(t, ds, "driver").Args; !slices.Contains(args, want) {
				t.Errorf("driver args %v lack %s", args, want)
			}
		})
	}
	// The same values render the same objects on every version.
	a, b := render(t, "--kube-version", "1.30.0", "--set", "providers.vault.enabled=true"), render(t, "--kube-version", "1.37.2", "--set", "providers.vault.enabled=true")
	if !reflect.DeepEqual(a["CSIDriver/ephemeral-secrets.csi.dev"], b["CSIDriver/ephemeral-secrets.csi.dev"]) {
		t.Error("the CSIDriver depends on the Kubernetes version helm assumes")
	}
	// Set for a cluster helm sees is older than 1.35, it is refused: that
	// API server would drop the field with a warning, and every volume that
	// needs a token would fail.
	if out, err := helm(t, "template", "esc", chartDir, "--kube-version", "1.34.9", "--set", "providers.vault.enabled=true,csiDriver.tokensInSecrets=true"); err == nil ||
		!strings.Contains(out, "csiDriver.tokensInSecrets=true needs Kubernetes 1.35") {
		t.Errorf("tokensInSecrets=true rendered for 1.34 (err %v):\n%.300s", err, out)
	}
	// gcp has no audience of its own: enabled without one, nothing renders.
	if out, err := helm(t, "template", "esc", chartDir, "--set", "providers.gcp.enabled=true"); err == nil ||
		!strings.Contains(out, "providers.gcp.tokenAudience is required") {
		t.Errorf("providers.gcp.enabled without tokenAudience rendered (err %v):\n%.300s", err, out)
	}
	// The value it replaced is refused, not ignored.
	if out, err := helm(t, "template", "esc", chartDir, "--set", "csiDriver.serviceAccountTokenInSecrets=auto"); err == nil {
		t.Errorf("csiDriver.serviceAccountTokenInSecrets accepted:\n%.300s", out)
	}
	// Below the chart's kubeVersion, nothing renders.
	if out, err := helm(t, "template", "esc", chartDir, "--kube-version", "1.24.0"); err == nil {
		t.Errorf("rendered for Kubernetes 1.24:\n%.300s", out)
	}
}

// Install profiles: the issuer runs only with providers.postgres.enabled
// (and issuer.enabled); a Vault-only or AWS-only install has no issuer,
// no way to it, and a backend Secret the node plugins need. The node
// plugin runs the image's lean binary, the lean one with aws where aws is
// enabled, the all-in-one only where it runs the issuer in process; the
// cluster's pods run the all-in-one.
func TestProfiles(t *testing.T) {
	const node, aws, all = "/ephemeral-secrets-csi", "/ephemeral-secrets-csi-aws", "/ephemeral-secrets-csi-all"
	for _, tc := range []struct {
		name     string
		set      string
		issuer   bool
		optional bool   // the node plugins' backend Secret
		binary   string // the node plugin's
	}{
		{"default", "", false, false, node},
		{"vault only", "providers.vault.enabled=true", false, false, node},
		{"aws only", "providers.aws.enabled=true", false, false, aws},
		{"gcp only", "providers.gcp.enabled=true,providers.gcp.tokenAudience=https://iam.googleapis.com/x", false, false, node},
		{"postgres through the issuer", "providers.postgres.enabled=true", true, true, node},
		{"postgres and vault", "providers.postgres.enabled=true,providers.vault.enabled=true", true, true, node},
		{"postgres and aws", "providers.postgres.enabled=true,providers.aws.enabled=true", true, true, aws},
		{"postgres held by the nodes, and aws", "providers.postgres.enabled=true,issuer.enabled=false,providers.aws.enabled=true", false, false, all},
		{"postgres held by the nodes", "providers.postgres.enabled=true,issuer.enabled=false", false, false, all},
		{"issuer without postgres", "issuer.enabled=true", false, false, node},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var args []string
			if tc.set != "" {
				args = []string{"--set", tc.set}
			}
			objs := render(t, args...)
			var issuerObjs []string
			for k := range objs {
				if strings.Contains(k, "-issuer") && !strings.HasPrefix(k, "ValidatingAdmissionPolicy") {
					issuerObjs = append(issuerObjs, k)
				}
			}
			if got := len(issuerObjs) > 0; got != tc.issuer {
				t.Errorf("issuer objects %v: want the issuer %v", issuerObjs, tc.issuer)
			}
			ds := into[appsv1.DaemonSet](t, objs, "DaemonSet/ephemeral-secrets-csi")
			if got := container(t, ds, "driver").Command; !slices.Equal(got, []string{tc.binary}) {
				t.Errorf("the node plugin runs %q, want %s", got, tc.binary)
			}
			var cluster []corev1.Container
			for _, k := range []string{"Deployment/ephemeral-secrets-csi-housekeeper", "Deployment/ephemeral-secrets-csi-issuer"} {
				if objs[k] != nil {
					cluster = append(cluster, into[appsv1.Deployment](t, objs, k).Spec.Template.Spec.Containers...)
				}
			}
			for k := range objs {
				if strings.HasPrefix(k, "Job/") {
					cluster = append(cluster, into[batchv1.Job](t, objs, k).Spec.Template.Spec.Containers...)
				}
			}
			if len(cluster) < 2 {
				t.Errorf("%d containers of the housekeeper and the uninstall hook", len(cluster))
			}
			for _, c := range cluster {
				if !slices.Equal(c.Command, []string{all}) {
					t.Errorf("container %s runs %q, want %s", c.Name, c.Command, all)
				}
			}
			if got := slices.ContainsFunc(container(t, ds, "driver").Args, func(a string) bool { return strings.HasPrefix(a, "--issuer-") }); got != tc.issuer {
				t.Errorf("driver args %v: --issuer-* %v, want %v", container(t, ds, "driver").Args, got, tc.issuer)
			}
			for _, v := range ds.Spec.Template.Spec.Volumes {
				if v.Name == "backends" && (v.Secret.Optional == nil || *v.Secret.Optional != tc.optional) {
					t.Errorf("backend Secret optional %v, want %v", v.Secret.Optional, tc.optional)
				}
			}
			// The housekeeper and the uninstall hook, whatever the profile.
			for _, k := range []string{"Deployment/ephemeral-secrets-csi-housekeeper", "Job/ephemeral-secrets-csi-uninstall"} {
				if objs[k] == nil {
					t.Errorf("no %s: %v", k, keysOf(objs))
				}
			}
		})
	}
	// The schema and the templates refuse a PostgreSQL-through-issuer
	// install without what it needs.
	for _, set := range []string{
		"providers.postgres.enabled=true,issuer.backends.secretName=null",
		"providers.postgres.enabled=true,issuer.replicas=0",
		"providers.postgres.enabled=true,issuer.backends.secretName=ephemeral-secrets-backends",
		"providers.postgres.enabled=yes",
	} {
		if out, err := helm(t, "template", "esc", chartDir, "--set", set); err == nil {
			t.Errorf("helm template --set %s passed:\n%.300s", set, out)
		}
	}
}

// No priority class by default (a system-* class outside kube-system is
// refused without a ResourceQuota of it); set, the quota comes with it.
func TestPriorityClassAnywhere(t *testing.T) {
	ds := into[appsv1.DaemonSet](t, render(t), "DaemonSet/ephemeral-secrets-csi")
	if pc := ds.Spec.Template.Spec.PriorityClassName; pc != "" {
		t.Errorf("default priorityClassName %q, want none", pc)
	}
	if _, ok := render(t)["ResourceQuota/ephemeral-secrets-csi-critical-pods"]; ok {
		t.Error("a ResourceQuota rendered without a priority class")
	}
	objs := render(t, "--set", "priorityClassName=system-node-critical")
	q := into[corev1.ResourceQuota](t, objs, "ResourceQuota/ephemeral-secrets-csi-critical-pods")
	if sel := q.Spec.ScopeSelector; sel == nil || len(sel.MatchExpressions) != 1 || sel.MatchExpressions[0].ScopeName != corev1.ResourceQuotaScopePriorityClass ||
		!slices.Equal(sel.MatchExpressions[0].Values, []string{"system-node-critical"}) {
		t.Errorf("ResourceQuota scope %+v", q.Spec.ScopeSelector)
	}
	if _, ok := render(t, "--set", "priorityClassName=system-node-critical", "--namespace", "kube-system")["ResourceQuota/ephemeral-secrets-csi-critical-pods"]; ok {
		t.Error("a ResourceQuota rendered in kube-system")
	}
	if _, ok := render(t, "--set", "priorityClassName=my-class")["ResourceQuota/ephemeral-secrets-csi-critical-pods"]; ok {
		t.Error("a ResourceQuota rendered for a class of the user's")
	}
}

// helm lint --strict passes with the defaults and with every value set.
func TestLintStrict(t *testing.T) {
	for _, args := range [][]string{nil, {"-f", "testdata/every-value.yaml"}} {
		all := append([]string{"lint", "--strict", chartDir}, args...)
		if out, err := helm(t, all...); err != nil {
			t.Errorf("helm %v: %v\n%s", all, err, out)
		}
	}
}

// testdata/every-value.yaml sets every value of values.yaml (each leaf,
// to something other than its default), so that a value added to the
// chart without a check here fails this test.
func TestEveryValueFileCoversValuesYAML(t *testing.T) {
	read := func(path string) map[string]any {
		data, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		var m map[string]any
		if err := yaml.Unmarshal(data, &m); err != nil {
			t.Fatal(err)
		}
		return m
	}
	defaults := read(filepath.Join(chartDir, "values.yaml"))
	every := read("testdata/every-value.yaml")
	// Set, but to the default: the dashboard is on (TestDashboardCanBeOff
	// turns it off).
	same := map[string]bool{"monitoring.dashboard.enabled": true, "issuer.enabled": true, "uninstall.hook": true}
	// Maps a user replaces whole: compared whole.
	whole := map[string]bool{"nodeSelector": true, "updateStrategy": true, "monitoring.dashboard.labels": true, "issuer.nodeSelector": true,
		"housekeeper.nodeSelector": true}
	var walk func(prefix string, d, e map[string]any)
	walk = func(prefix string, d, e map[string]any) {
		for k, dv := range d {
			path := prefix + k
			ev, ok := e[k]
			if !ok {
				t.Errorf("%s is not set in testdata/every-value.yaml", path)
				continue
			}
			dm, dIsMap := dv.(map[string]any)
			em, eIsMap := ev.(map[string]any)
			if dIsMap && eIsMap && len(dm) > 0 && !whole[path] {
				walk(path+".", dm, em)
				continue
			}
			if reflect.DeepEqual(dv, ev) && !same[path] {
				t.Errorf("%s is set to its default (%v) in testdata/every-value.yaml", path, dv)
			}
		}
	}
	walk("", defaults, every)
}

func TestDashboardCanBeOff(t *testing.T) {
	on := render(t, "--set", "monitoring.enabled=true")
	off := render(t, "--set", "monitoring.enabled=true,monitoring.dashboard.enabled=false")
	if on["ConfigMap/ephemeral-secrets-csi-dashboard"] == nil || off["ConfigMap/ephemeral-secrets-csi-dashboard"] != nil {
		t.Errorf("dashboard: on %v, off %v", keysOf(on), keysOf(off))
	}
	if off["PrometheusRule/ephemeral-secrets-csi"] == nil {
		t.Error("the alerts went with the dashboard")
	}
}
