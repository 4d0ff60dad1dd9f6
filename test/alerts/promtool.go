package alerts

import (
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"time"

	"sigs.k8s.io/yaml"
)

// Rules are alerting rules in Prometheus' rule-file format (a
// PrometheusRule's spec).
type Rules struct {
	Groups []Group `json:"groups"`
}

// Group is a rule group.
type Group struct {
	Name  string `json:"name"`
	Rules []Rule `json:"rules"`
}

// Rule is one alerting rule.
type Rule struct {
	Alert       string            `json:"alert"`
	Expr        string            `json:"expr"`
	For         string            `json:"for,omitempty"`
	Labels      map[string]string `json:"labels,omitempty"`
	Annotations map[string]string `json:"annotations,omitempty"`
}

// Alerts are the rules' alerts by name.
func (r Rules) Alerts() map[string]Rule {
	m := map[string]Rule{}
	for _, g := range r.Groups {
		for _, rule := range g.Rules {
			m[rule.Alert] = rule
		}
	}
	return m
}

// Case is one test group of promtool: a recording, and the alerts that
// must fire at its last step with their labels (the expression's; the
// rule's own are added). Every other alert must not fire.
type Case struct {
	Name      string
	Recording *Recording
	Firing    map[string][]map[string]string
}

// promtool's unit-test file.
type testFile struct {
	RuleFiles          []string    `json:"rule_files"`
	EvaluationInterval string      `json:"evaluation_interval"`
	Tests              []testGroup `json:"tests"`
}

type testGroup struct {
	Name          string      `json:"name"`
	Interval      string      `json:"interval"`
	InputSeries   []Series    `json:"input_series"`
	AlertRuleTest []alertTest `json:"alert_rule_test"`
}

type alertTest struct {
	EvalTime  string     `json:"eval_time"`
	Alertname string     `json:"alertname"`
	ExpAlerts []expAlert `json:"exp_alerts"`
}

type expAlert struct {
	ExpLabels map[string]string `json:"exp_labels"`
}

// TestRules writes rules and cases in dir and runs `promtool test rules`
// on them. The rules are checked whole first (`promtool check rules`:
// expressions and annotation templates); the tests run them without their
// annotations, whose text holds the value of the moment ($value), so that
// an alert is asserted by its name and labels. It returns promtool's
// output; the error says the rules or an assertion failed.
func TestRules(promtool, dir string, rules Rules, cases []Case) (string, error) {
	full := filepath.Join(dir, "rules.yaml")
	if err := writeYAML(full, rules); err != nil {
		return "", err
	}
	if out, err := exec.Command(promtool, "check", "rules", full).CombinedOutput(); err != nil {
		return string(out), fmt.Errorf("promtool check rules: %w", err)
	}
	bare := Rules{}
	for _, g := range rules.Groups {
		ng := Group{Name: g.Name}
		for _, r := range g.Rules {
			r.Annotations = nil
			ng.Rules = append(ng.Rules, r)
		}
		bare.Groups = append(bare.Groups, ng)
	}
	if err := writeYAML(filepath.Join(dir, "bare-rules.yaml"), bare); err != nil {
		return "", err
	}
	alerts := rules.Alerts()
	tf := testFile{RuleFiles: []string{"bare-rules.yaml"}, EvaluationInterval: "1m"}
	for _, c := range cases {
		rec := c.Recording
		if rec.Steps() == 0 {
			return "", fmt.Errorf("case %s: no scrape", c.Name)
		}
		for name := range c.Firing {
			if _, ok := alerts[name]; !ok {
				return "", fmt.Errorf("case %s: no alert %s in the rules", c.Name, name)
			}
		}
		tg := testGroup{Name: c.Name, Interval: duration(rec.Interval), InputSeries: rec.InputSeries()}
		at := duration(time.Duration(rec.Steps()-1) * rec.Interval)
		for _, name := range slices.Sorted(maps.Keys(alerts)) {
			exp := []expAlert{}
			for _, labels := range c.Firing[name] {
				l := map[string]string{}
				for k, v := range alerts[name].Labels {
					l[k] = v
				}
				for k, v := range labels {
					l[k] = v
				}
				exp = append(exp, expAlert{ExpLabels: l})
			}
			tg.AlertRuleTest = append(tg.AlertRuleTest, alertTest{EvalTime: at, Alertname: name, ExpAlerts: exp})
		}
		tf.Tests = append(tf.Tests, tg)
	}
	path := filepath.Join(dir, "tests.yaml")
	if err := writeYAML(path, tf); err != nil {
		return "", err
	}
	cmd := exec.Command(promtool, "test", "rules", "tests.yaml")
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("promtool test rules (%s): %w", path, err)
	}
	return string(out), nil
}

func writeYAML(path string, v any) error {
	b, err := yaml.Marshal(v)
	if err != nil {
		return err
	}
	return os.WriteFile(path, b, 0o600)
}

// duration is d in promtool's notation, in whole seconds.
func duration(d time.Duration) string { return strconv.Itoa(int(d.Seconds())) + "s" }
