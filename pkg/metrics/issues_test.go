package metrics

import (
	"strings"
	"testing"
)

// Each issue counts once for its namespace, service account and
// provider, and only there; a nil *Metrics counts nothing.
func TestServiceAccountIssues(t *testing.T) {
	type issue struct{ ns, sa, prov string }
	tests := []struct {
		name   string
		issues []issue
		want   []string // the counter's sample lines, sorted as exposed
	}{
		{name: "none", want: nil},
		{name: "one", issues: []issue{{"shop", "orders", "postgres"}},
			want: []string{`ephemeral_secrets_service_account_issues_total{namespace="shop",provider="postgres",service_account="orders"} 1`}},
		{name: "apart by each label", issues: []issue{
			{"shop", "orders", "postgres"}, {"shop", "orders", "postgres"}, {"shop", "orders", "vault"},
			{"shop", "web", "postgres"}, {"lab", "orders", "postgres"},
		}, want: []string{
			`ephemeral_secrets_service_account_issues_total{namespace="lab",provider="postgres",service_account="orders"} 1`,
			`ephemeral_secrets_service_account_issues_total{namespace="shop",provider="postgres",service_account="orders"} 2`,
			`ephemeral_secrets_service_account_issues_total{namespace="shop",provider="postgres",service_account="web"} 1`,
			`ephemeral_secrets_service_account_issues_total{namespace="shop",provider="vault",service_account="orders"} 1`,
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m := New(func() State { return State{} })
			for _, i := range tc.issues {
				m.Issued(i.ns, i.sa, i.prov)
			}
			var got []string
			for _, line := range strings.Split(exposition(t, m.reg, "ephemeral_secrets_service_account_issues_total"), "\n") {
				if line != "" && !strings.HasPrefix(line, "#") {
					got = append(got, line)
				}
			}
			if strings.Join(got, "\n") != strings.Join(tc.want, "\n") {
				t.Errorf("exposed:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(tc.want, "\n"))
			}
		})
	}
	var none *Metrics
	none.Issued("shop", "orders", "postgres") // records nothing, does not panic
}
