package metrics

import (
	"errors"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/expfmt"
)

// The reaper's series are the same, name, type, help and labels, whether
// the driver's in-process issuer or the cluster issuer reaps: one set of
// alerts and dashboards reads both.
func TestReaperSeriesAreTheSameInBothProcesses(t *testing.T) {
	driver := New(func() State { return State{} })
	iss := NewIssuer(IssuerOptions{})
	driver.Reaped(2, 1, 3)
	iss.Reaped(2, 1, 3)
	want := `
# HELP ephemeral_secrets_issuer_reap_failures_total Roles the issuer's reaper failed to drop, and connections it failed to list (retried at the next pass).
# TYPE ephemeral_secrets_issuer_reap_failures_total counter
ephemeral_secrets_issuer_reap_failures_total 3
# HELP ephemeral_secrets_issuer_reaped_roles_total PostgreSQL roles the issuer's reaper dropped, by reason (expired: VALID UNTIL passed; untracked: no inventory record).
# TYPE ephemeral_secrets_issuer_reaped_roles_total counter
ephemeral_secrets_issuer_reaped_roles_total{reason="expired"} 2
ephemeral_secrets_issuer_reaped_roles_total{reason="untracked"} 1
`
	names := []string{"ephemeral_secrets_issuer_reap_failures_total", "ephemeral_secrets_issuer_reaped_roles_total"}
	for name, reg := range map[string]prometheus.Gatherer{"driver": driver.reg, "issuer": iss.reg} {
		if got := exposition(t, reg, names...); got != strings.TrimSpace(want) {
			t.Errorf("%s exports:\n%s\nwant:\n%s", name, got, want)
		}
	}
}

// Before any pass, both reasons and the failures are 0, not missing: a
// rate over them is 0 at once.
func TestReaperSeriesExistBeforeAPass(t *testing.T) {
	iss := NewIssuer(IssuerOptions{})
	want := `# HELP ephemeral_secrets_issuer_reap_failures_total Roles the issuer's reaper failed to drop, and connections it failed to list (retried at the next pass).
# TYPE ephemeral_secrets_issuer_reap_failures_total counter
ephemeral_secrets_issuer_reap_failures_total 0
# HELP ephemeral_secrets_issuer_reaped_roles_total PostgreSQL roles the issuer's reaper dropped, by reason (expired: VALID UNTIL passed; untracked: no inventory record).
# TYPE ephemeral_secrets_issuer_reaped_roles_total counter
ephemeral_secrets_issuer_reaped_roles_total{reason="expired"} 0
ephemeral_secrets_issuer_reaped_roles_total{reason="untracked"} 0`
	if got := exposition(t, iss.reg, "ephemeral_secrets_issuer_reap_failures_total", "ephemeral_secrets_issuer_reaped_roles_total"); got != want {
		t.Errorf("before a pass:\n%s\nwant:\n%s", got, want)
	}
}

func TestIssuerMetrics(t *testing.T) {
	iss := NewIssuer(IssuerOptions{Revoking: func() Revoking {
		return Revoking{Issuer: Backlog{Count: 2, Oldest: 90 * time.Second}}
	}})
	iss.Request("mint", "OK", time.Millisecond)
	iss.Request("mint", "Unavailable", time.Millisecond)
	iss.Request("drop", "OK", time.Millisecond)
	iss.InventoryRevocation(nil)
	iss.InventoryRevocation(errors.New("connection refused"))
	iss.InventoryRevocation(errors.New("connection refused"))
	iss.Leading(true)
	for _, c := range []struct {
		name, want string
	}{
		{"ephemeral_secrets_issuer_requests_total", `
# HELP ephemeral_secrets_issuer_requests_total Node plugins' requests to the issuer, by verb (mint, extend, drop) and answer code (OK, Unavailable, PermissionDenied, ..., Internal).
# TYPE ephemeral_secrets_issuer_requests_total counter
ephemeral_secrets_issuer_requests_total{code="OK",verb="drop"} 1
ephemeral_secrets_issuer_requests_total{code="OK",verb="mint"} 1
ephemeral_secrets_issuer_requests_total{code="Unavailable",verb="mint"} 1
`},
		{"ephemeral_secrets_inventory_revocations_total", `
# HELP ephemeral_secrets_inventory_revocations_total Revocations by the leader's inventory controller of the credentials of deleted records (the Pod's deletion, the kill switch), by outcome (success, error: retried).
# TYPE ephemeral_secrets_inventory_revocations_total counter
ephemeral_secrets_inventory_revocations_total{outcome="error"} 2
ephemeral_secrets_inventory_revocations_total{outcome="success"} 1
`},
		{"ephemeral_secrets_issuer_leader", `
# HELP ephemeral_secrets_issuer_leader 1 while this replica leads (reaps and runs the inventory controller).
# TYPE ephemeral_secrets_issuer_leader gauge
ephemeral_secrets_issuer_leader 1
`},
		{"ephemeral_secrets_inventory_revoking_credentials", `
# HELP ephemeral_secrets_inventory_revoking_credentials Credential records being deleted whose credential is not revoked yet (state Revoking), by who revokes it (issuer: PostgreSQL; node: the node plugin, Vault and AWS).
# TYPE ephemeral_secrets_inventory_revoking_credentials gauge
ephemeral_secrets_inventory_revoking_credentials{revoker="issuer"} 2
ephemeral_secrets_inventory_revoking_credentials{revoker="node"} 0
`},
		{"ephemeral_secrets_inventory_revoking_oldest_seconds", `
# HELP ephemeral_secrets_inventory_revoking_oldest_seconds Time since the deletion of the oldest Credential record still waiting for its revocation, by who revokes it (0 with none).
# TYPE ephemeral_secrets_inventory_revoking_oldest_seconds gauge
ephemeral_secrets_inventory_revoking_oldest_seconds{revoker="issuer"} 90
ephemeral_secrets_inventory_revoking_oldest_seconds{revoker="node"} 0
`},
	} {
		if got := exposition(t, iss.reg, c.name); got != strings.TrimSpace(c.want) {
			t.Errorf("%s:\n%s\nwant:%s", c.name, got, c.want)
		}
	}
	iss.Leading(false)
	if got := exposition(t, iss.reg, "ephemeral_secrets_issuer_leader"); !strings.HasSuffix(got, "\nephemeral_secrets_issuer_leader 0") {
		t.Errorf("leader after losing the lease:\n%s", got)
	}
}

// Without an inventory the backlog gauges are not exported at all (rather
// than a 0 that would say "nothing stuck").
func TestIssuerWithoutInventoryHasNoBacklog(t *testing.T) {
	mfs, err := NewIssuer(IssuerOptions{}).reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if strings.HasPrefix(mf.GetName(), "ephemeral_secrets_inventory_revoking") {
			t.Errorf("%s exported without an inventory", mf.GetName())
		}
	}
}

// The handler serves the registry, liveness, and readiness as ready says.
func TestIssuerHandler(t *testing.T) {
	ready := false
	h := NewIssuer(IssuerOptions{}).Handler(func() bool { return ready })
	get := func(path string) (int, string) {
		w := httptest.NewRecorder()
		h.ServeHTTP(w, httptest.NewRequest("GET", path, nil))
		return w.Code, w.Body.String()
	}
	if code, body := get("/metrics"); code != 200 || !strings.Contains(body, "ephemeral_secrets_issuer_leader 0") {
		t.Errorf("/metrics: %d %.200s", code, body)
	}
	if code, _ := get("/healthz"); code != 200 {
		t.Errorf("/healthz: %d", code)
	}
	if code, _ := get("/readyz"); code != 503 {
		t.Errorf("/readyz before the certificate: %d", code)
	}
	ready = true
	if code, _ := get("/readyz"); code != 200 {
		t.Errorf("/readyz with the certificate: %d", code)
	}
}

// exposition is the text exposition of the families of reg named names.
func exposition(t *testing.T, reg prometheus.Gatherer, names ...string) string {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	for _, mf := range mfs {
		if slices.Contains(names, mf.GetName()) {
			if _, err := expfmt.MetricFamilyToText(&b, mf); err != nil {
				t.Fatal(err)
			}
		}
	}
	return strings.TrimSpace(b.String())
}
