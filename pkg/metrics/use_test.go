package metrics

import (
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// The use sampler's series are the same whichever process samples (the
// driver's in-process issuer or the cluster issuer), with the names the
// chart's alerts read.
func TestUseSeriesAreTheSameInBothProcesses(t *testing.T) {
	driver := New(func() State { return State{} })
	iss := NewIssuer(IssuerOptions{})
	for _, u := range []*Use{driver.Use(), iss.Use()} {
		u.Sessions("main", 3)
		u.FirstUse("main")
		u.Foreign("main", "app", "revoke")
		u.NeverUsed("main", "app")
		u.Unused("main", "app")
		u.Blind("main", true)
		u.Sampled("main", 2*time.Millisecond)
	}
	want := map[string]string{
		"ephemeral_secrets_use_sessions_observed_total": `ephemeral_secrets_use_sessions_observed_total{connection="main"} 3`,
		"ephemeral_secrets_use_first_total":             `ephemeral_secrets_use_first_total{connection="main"} 1`,
		"ephemeral_secrets_use_foreign_total":           `ephemeral_secrets_use_foreign_total{action="revoke",connection="main",role="app"} 1`,
		"ephemeral_secrets_use_never_used_total":        `ephemeral_secrets_use_never_used_total{connection="main",role="app"} 1`,
		"ephemeral_secrets_use_unused_total":            `ephemeral_secrets_use_unused_total{connection="main",role="app"} 1`,
		"ephemeral_secrets_use_sampling_blind":          `ephemeral_secrets_use_sampling_blind{connection="main"} 1`,
		"ephemeral_secrets_use_sample_duration_seconds": `ephemeral_secrets_use_sample_duration_seconds_count{connection="main"} 1`,
	}
	for name, reg := range map[string]prometheus.Gatherer{"driver": driver.reg, "issuer": iss.reg} {
		for metric, line := range want {
			if got := exposition(t, reg, metric); !strings.Contains(got, line) {
				t.Errorf("%s exports of %s:\n%s\nwant a line %s", name, metric, got, line)
			}
		}
	}
	var none *Use
	none.Sessions("main", 1) // a nil *Use records nothing, and does not panic
}
