package alerts

import (
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ephemeral-secrets/csi-driver/test/harness"
)

// ramp is a series' values, one a step: from is the first step with a
// value (before it: none), then each step adds the step's slope
// (slopes[i] from step at[i] on).
type ramp struct {
	from   int
	at     []int
	slopes []float64
}

// values is r over steps steps in promtool's notation ("_": no value).
func (r ramp) values(steps int) string {
	vals := make([]string, steps)
	v, slope := 0.0, 0.0
	for i := range steps {
		for j, at := range r.at {
			if i == at {
				slope = r.slopes[j]
			}
		}
		if i < r.from {
			vals[i] = "_"
			continue
		}
		if i > r.from {
			v += slope
		}
		vals[i] = strconv.FormatFloat(v, 'g', -1, 64)
	}
	return strings.Join(vals, " ")
}

// constant is a series of value v at every step from from on.
func constant(v float64, from, steps int) string {
	vals := make([]string, steps)
	for i := range vals {
		vals[i] = "_"
		if i >= from {
			vals[i] = strconv.FormatFloat(v, 'g', -1, 64)
		}
	}
	return strings.Join(vals, " ")
}

// up is the up series of the node plugins of nodes and of an issuer
// replica, answering at every step: the absent-target alerts stay quiet.
func up(jobs map[string]string, steps int, nodes ...string) []Series {
	out := []Series{{Series: `up{instance="10.0.0.9:9811",job="` + jobs["issuer"] + `",pod="issuer-1"}`, Values: constant(1, 0, steps)}}
	for _, n := range nodes {
		out = append(out, Series{Series: `up{instance="` + n + `:9810",job="` + jobs["node"] + `",node="` + n + `"}`, Values: constant(1, 0, steps)})
	}
	return out
}

// The alerts of the use of credentials and of issue-rate anomalies, run
// by promtool on series written out (a day of history, which no real run
// can record; the use metrics' names and labels are the issuer's, see
// pkg/issuer/use): each fires where it must and nowhere else.
func TestUseAndIssueRateAlerts(t *testing.T) {
	promtool, err := harness.Tool("promtool")
	if err != nil {
		t.Fatal(err)
	}
	rules, jobs := rendered(t)

	// Issue rates, a minute a step, a day and 25 minutes: n1 issues one
	// credential a minute, then 30 (a spike: fires); n2 forty a minute
	// all day (high, but its own usual: quiet); n3 one, then four (below
	// five times its average: quiet); n4 is new, 30 a minute for its hour
	// (no day behind it: quiet); n5 one, then 5 a minute (five times, but
	// under the floor of 6 a minute: quiet).
	const day, spike = 1440, 25
	steps := day + spike + 1
	issues := func(n string) string {
		return `ephemeral_secrets_lease_operations_total{instance="` + n + `:9810",job="` + jobs["node"] + `",node="` + n + `",operation="issue",outcome="success",provider="postgres"}`
	}
	rate := append(up(jobs, steps, "n1", "n2", "n3", "n4", "n5"),
		Series{Series: issues("n1"), Values: ramp{at: []int{0, day}, slopes: []float64{1, 30}}.values(steps)},
		Series{Series: issues("n2"), Values: ramp{at: []int{0}, slopes: []float64{40}}.values(steps)},
		Series{Series: issues("n3"), Values: ramp{at: []int{0, day}, slopes: []float64{1, 4}}.values(steps)},
		Series{Series: issues("n4"), Values: ramp{from: steps - 60, at: []int{0}, slopes: []float64{30}}.values(steps)},
		Series{Series: issues("n5"), Values: ramp{at: []int{0, day}, slopes: []float64{1, 5}}.values(steps)},
		// Failed issues do not count.
		Series{Series: strings.Replace(issues("n2"), `outcome="success"`, `outcome="error"`, 1), Values: ramp{at: []int{0, day}, slopes: []float64{0, 100}}.values(steps)},
	)

	// Use, a minute a step for 30 minutes: role app's credential used
	// from elsewhere for the first time 4 minutes ago (its counter is
	// new: fires); orders' counter, at zero since start, counted one 3
	// minutes ago (fires); reports' at zero all along and batch's first
	// foreign use 20 minutes ago (quiet); the replica connection blind for
	// its last 8 minutes (fires), main never (but on a replica that led
	// no more: quiet).
	const useSteps = 30
	foreign := func(role, action string) string {
		return `ephemeral_secrets_use_foreign_total{action="` + action + `",connection="main",instance="10.0.0.9:9811",job="` + jobs["issuer"] + `",pod="issuer-1",role="` + role + `"}`
	}
	blind := func(conn string) string {
		return `ephemeral_secrets_use_sampling_blind{connection="` + conn + `",instance="10.0.0.9:9811",job="` + jobs["issuer"] + `",pod="issuer-1"}`
	}
	// issuer-2 led, blind on main, and leads no more: its gauge is stale.
	replica := `{instance="10.0.0.10:9811",job="` + jobs["issuer"] + `",pod="issuer-2"}`
	use := append(up(jobs, useSteps, "n1"),
		Series{Series: foreign("app", "revoke"), Values: constant(1, useSteps-5, useSteps)},
		Series{Series: foreign("orders", "alert"), Values: strings.Repeat("0 ", useSteps-4) + "1 1 1 1"},
		Series{Series: foreign("reports", "alert"), Values: constant(0, 0, useSteps)},
		Series{Series: foreign("batch", "record"), Values: constant(1, 9, useSteps)},
		Series{Series: blind("main"), Values: constant(0, 0, useSteps)},
		Series{Series: blind("replica"), Values: strings.Repeat("0 ", useSteps-9) + constant(1, 0, 9)},
		Series{Series: `ephemeral_secrets_issuer_leader{instance="10.0.0.9:9811",job="` + jobs["issuer"] + `",pod="issuer-1"}`, Values: constant(1, 0, useSteps)},
		Series{Series: `up` + replica, Values: constant(1, 0, useSteps)},
		Series{Series: `ephemeral_secrets_issuer_leader` + replica, Values: constant(0, 0, useSteps)},
		Series{Series: `ephemeral_secrets_use_sampling_blind` + strings.Replace(replica, "{", `{connection="main",`, 1), Values: constant(1, 0, useSteps)},
	)

	cases := []Case{
		{Name: "issue rates", Series: rate, Interval: time.Minute, Steps: steps,
			Firing: map[string][]map[string]string{"EphemeralSecretsIssueRateAnomaly": {{"node": "n1", "provider": "postgres"}}},
			Exprs: []Expr{{Expr: `node_provider:ephemeral_secrets_lease_issues:rate5m{node="n2"}`,
				Samples: []Sample{{Labels: `node_provider:ephemeral_secrets_lease_issues:rate5m{node="n2",provider="postgres"}`, Value: 40.0 / 60}}}}},
		{Name: "use", Series: use, Interval: time.Minute, Steps: useSteps,
			Firing: map[string][]map[string]string{
				"EphemeralSecretsCredentialUsedElsewhere": {
					{"connection": "main", "role": "app", "action": "revoke"},
					{"connection": "main", "role": "orders", "action": "alert"},
				},
				"EphemeralSecretsIssuerCannotSeeSessions": {{"connection": "replica"}},
			}},
	}
	out, err := TestRules(promtool, t.TempDir(), rules, cases)
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	t.Logf("promtool:\n%s", out)
}
