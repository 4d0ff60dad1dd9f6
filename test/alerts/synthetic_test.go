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

// rateRule is the recording rule of a service account's 5-minute issue
// rate (summed over nodes and providers).
const rateRule = "namespace_service_account:ephemeral_secrets_service_account_issues:rate5m"

// The alerts of the use of credentials and of issue-rate anomalies, run
// by promtool on series written out (a day of history, which no real run
// can record; the use metrics' names and labels are the issuer's, see
// pkg/issuer/use, and the node plugin's, pkg/metrics/issues.go): each
// fires where it must and nowhere else.
func TestUseAndIssueRateAlerts(t *testing.T) {
	promtool, err := harness.Tool("promtool")
	if err != nil {
		t.Fatal(err)
	}
	rules, jobs := rendered(t)

	// Issue rates by service account, a minute a step, a day and 25
	// minutes. shop/orders issues half a credential a minute on each of
	// two nodes (postgres on n1, vault on n2), then four a minute on each:
	// eight a minute in all, fires (on neither node alone: each is under
	// the floor of 6 a minute). shop/web 40 a minute all day (high, but
	// its own usual: quiet); lab/orders, the same name in another
	// namespace, one a minute all day (quiet); lab/agents one, then four
	// (below five times its average: quiet); lab/batch is new, 30 a minute
	// for its hour (no day behind it: quiet); lab/cron 0.2, then 5 a
	// minute (25 times its average, under the floor: quiet).
	const day, spike = 1440, 25
	steps := day + spike + 1
	issues := func(node, prov, ns, sa string) string {
		return `ephemeral_secrets_service_account_issues_total{instance="` + node + `:9810",job="` + jobs["node"] + `",namespace="` + ns +
			`",node="` + node + `",provider="` + prov + `",service_account="` + sa + `"}`
	}
	rate := append(up(jobs, steps, "n1", "n2", "n3"),
		Series{Series: issues("n1", "postgres", "shop", "orders"), Values: ramp{at: []int{0, day}, slopes: []float64{0.5, 4}}.values(steps)},
		Series{Series: issues("n2", "vault", "shop", "orders"), Values: ramp{at: []int{0, day}, slopes: []float64{0.5, 4}}.values(steps)},
		Series{Series: issues("n1", "postgres", "shop", "web"), Values: ramp{at: []int{0}, slopes: []float64{40}}.values(steps)},
		Series{Series: issues("n3", "postgres", "lab", "orders"), Values: ramp{at: []int{0}, slopes: []float64{1}}.values(steps)},
		Series{Series: issues("n3", "postgres", "lab", "agents"), Values: ramp{at: []int{0, day}, slopes: []float64{1, 4}}.values(steps)},
		Series{Series: issues("n2", "postgres", "lab", "batch"), Values: ramp{from: steps - 60, at: []int{0}, slopes: []float64{30}}.values(steps)},
		Series{Series: issues("n3", "vault", "lab", "cron"), Values: ramp{at: []int{0, day}, slopes: []float64{0.2, 5}}.values(steps)},
	)

	// Use, a minute a step for 30 minutes: role app's credential used
	// from elsewhere for the first time 4 minutes ago (its counter is
	// new: fires); orders' counter, at zero since start, counted one 3
	// minutes ago (fires); reports' at zero all along and batch's first
	// foreign use 20 minutes ago (quiet); the replica connection blind for
	// its last 8 minutes (fires), main never (but on a replica that led
	// no more: quiet). Node plugins that make roles themselves: n1 blind
	// on main for its last 8 minutes (fires), n2 for its last 3 (quiet:
	// under 5 minutes), n3 never.
	const useSteps = 30
	foreign := func(role, action string) string {
		return `ephemeral_secrets_use_foreign_total{action="` + action + `",connection="main",instance="10.0.0.9:9811",job="` + jobs["issuer"] + `",pod="issuer-1",role="` + role + `"}`
	}
	blind := func(conn string) string {
		return `ephemeral_secrets_use_sampling_blind{connection="` + conn + `",instance="10.0.0.9:9811",job="` + jobs["issuer"] + `",pod="issuer-1"}`
	}
	// issuer-2 led, blind on main, and leads no more: its gauge is stale.
	replica := `{instance="10.0.0.10:9811",job="` + jobs["issuer"] + `",pod="issuer-2"}`
	nodeBlind := func(node string) string {
		return `ephemeral_secrets_use_sampling_blind{connection="main",instance="` + node + `:9810",job="` + jobs["node"] + `",node="` + node + `"}`
	}
	use := append(up(jobs, useSteps, "n1", "n2", "n3"),
		Series{Series: nodeBlind("n1"), Values: strings.Repeat("0 ", useSteps-9) + constant(1, 0, 9)},
		Series{Series: nodeBlind("n2"), Values: strings.Repeat("0 ", useSteps-4) + constant(1, 0, 4)},
		Series{Series: nodeBlind("n3"), Values: constant(0, 0, useSteps)},
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
			Firing: map[string][]map[string]string{"EphemeralSecretsIssueRateAnomaly": {{"namespace": "shop", "service_account": "orders"}}},
			Exprs: []Expr{
				{Expr: rateRule + `{namespace="shop",service_account="web"}`,
					Samples: []Sample{{Labels: rateRule + `{namespace="shop",service_account="web"}`, Value: 40.0 / 60}}},
				{Expr: rateRule + `{namespace="shop",service_account="orders"}`,
					Samples: []Sample{{Labels: rateRule + `{namespace="shop",service_account="orders"}`, Value: 8.0 / 60}}},
			}},
		{Name: "use", Series: use, Interval: time.Minute, Steps: useSteps,
			Firing: map[string][]map[string]string{
				"EphemeralSecretsCredentialUsedElsewhere": {
					{"connection": "main", "role": "app", "action": "revoke"},
					{"connection": "main", "role": "orders", "action": "alert"},
				},
				"EphemeralSecretsIssuerCannotSeeSessions": {{"connection": "replica"}},
				"EphemeralSecretsNodeCannotSeeSessions":   {{"node": "n1", "connection": "main"}},
			}},
	}
	out, err := TestRules(promtool, t.TempDir(), rules, cases)
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	t.Logf("promtool:\n%s", out)
}
