package metrics

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

func TestHealthEndpoints(t *testing.T) {
	m := New(func() State { return State{} })
	notYet := errors.New("kubelet has not registered the driver")
	for _, tc := range []struct {
		name      string
		h         Health
		path      string
		code      int
		bodyHolds string
	}{
		{"live by default", Health{}, "/healthz", 200, "ok"},
		{"ready by default", Health{}, "/readyz", 200, "ok"},
		{"not ready says why", Health{Ready: func(context.Context) error { return notYet }}, "/readyz", 503, notYet.Error()},
		{"readiness is not liveness", Health{Ready: func(context.Context) error { return notYet }}, "/healthz", 200, "ok"},
		{"not live says why", Health{Live: func(context.Context) error { return notYet }}, "/healthz", 503, notYet.Error()},
		{"liveness is not readiness", Health{Live: func(context.Context) error { return notYet }}, "/readyz", 200, "ok"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := httptest.NewServer(m.Handler(tc.h))
			defer srv.Close()
			resp, err := http.Get(srv.URL + tc.path)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			body, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != tc.code || !strings.Contains(string(body), tc.bodyHolds) {
				t.Fatalf("%s: %d %q, want %d holding %q", tc.path, resp.StatusCode, body, tc.code, tc.bodyHolds)
			}
		})
	}
}

func TestNodeLockHeldGauge(t *testing.T) {
	m := New(func() State { return State{} })
	srv := httptest.NewServer(m.Handler(Health{}))
	defer srv.Close()
	scrape := func() string {
		resp, err := http.Get(srv.URL + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return string(b)
	}
	if body := scrape(); !strings.Contains(body, "ephemeral_secrets_node_lock_held 0") {
		t.Fatalf("a waiting instance's gauge is not 0")
	}
	m.NodeLockHeld(true)
	if body := scrape(); !strings.Contains(body, "ephemeral_secrets_node_lock_held 1") {
		t.Fatalf("the holder's gauge is not 1")
	}
	var none *Metrics
	none.NodeLockHeld(true) // a nil *Metrics records nothing
}
