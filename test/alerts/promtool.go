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

// Rule is one alerting or recording rule.
type Rule struct {
	Alert       string            `json:"alert,omitempty"`
	Record      string            `json:"record,omitempty"`
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
			if rule.Alert != "" {
				m[rule.Alert] = rule
			}
		}
	}
	return m
}

// Case is one test group of promtool: a recording (or series written
// out: Series, a value every Interval for Steps steps), and the alerts
// that must fire at its last step with their labels (the expression's;
// the rule's own are added). Every other alert must not fire. Exprs are
// the values expressions (a recording rule's series) must have then.
type Case struct {
	Name      string
	Recording *Recording
	Series    []Series
	Interval  time.Duration
	Steps     int
	Firing    map[string][]map[string]string
	Exprs     []Expr
}

// Expr is an expression and the samples it must give at a case's last
// step (promtool's promql_expr_test).
type Expr struct {
	Expr    string   `json:"expr"`
	At      string   `json:"eval_time"`
	Samples []Sample `json:"exp_samples"`
}

// Sample is one sample an Expr must give: its labels (the series in
// PromQL's notation) and value.
type Sample struct {
	Labels string  `json:"labels"`
	Value  float64 `json:"value"`
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
	PromQLTest    []Expr      `json:"promql_expr_test,omitempty"`
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
		series, interval, steps := c.Series, c.Interval, c.Steps
		if rec := c.Recording; rec != nil {
			series, interval, steps = rec.InputSeries(), rec.Interval, rec.Steps()
		}
		if steps == 0 || len(series) == 0 {
			return "", fmt.Errorf("case %s: no scrape", c.Name)
		}
		for name := range c.Firing {
			if _, ok := alerts[name]; !ok {
				return "", fmt.Errorf("case %s: no alert %s in the rules", c.Name, name)
			}
		}
		at := duration(time.Duration(steps-1) * interval)
		tg := testGroup{Name: c.Name, Interval: duration(interval), InputSeries: series}
		for _, e := range c.Exprs {
			e.At = at
			tg.PromQLTest = append(tg.PromQLTest, e)
		}
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
