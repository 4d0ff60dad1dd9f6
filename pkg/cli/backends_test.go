package cli

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/ephemeral-secrets/csi-driver/pkg/audit"
	"github.com/ephemeral-secrets/csi-driver/pkg/metrics"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/test/harness"
)

const pgConfig = `postgres:
  connections:
    main:
      url: postgres://admin:%s@127.0.0.1:1/postgres
      roles:
        reader:
          creationStatements: ['CREATE ROLE "{{.Name}}"']
          allowed: [{namespace: a, serviceAccount: b}]
`

// testSections serve the postgres section in these tests as
// ephemeral-secrets-csi-all does, decoding it strictly, with a provider
// that connects to nothing in place of the issuer.
var testSections = map[string]Section{"postgres": {Build: func(data []byte, _ SectionEnv) (Built, error) {
	var cfg struct {
		Connections map[string]any `json:"connections"`
	}
	if err := yaml.UnmarshalStrict(data, &cfg); err != nil {
		return Built{}, errors.New("postgres: not valid")
	}
	return Built{Provider: &idleProvider{}}, nil
}}}

// idleProvider is a provider that is never called.
type idleProvider struct{ provider.Provider }

// kubeletWrite writes the backend file as kubelet updates a Secret.
func kubeletWrite(t *testing.T, dir, content string) string {
	t.Helper()
	path, err := harness.WriteLikeKubelet(dir, "backends.yaml", content)
	if err != nil {
		t.Fatal(err)
	}
	return path
}

func scrape(t *testing.T, m *metrics.Metrics) string {
	t.Helper()
	srv := httptest.NewServer(m.Handler(metrics.Health{}))
	defer srv.Close()
	resp, err := srv.Client().Get(srv.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// TestReloadCountsEachBadVersionOnce: a broken file, and a file that
// cannot be read, are each one error however many checks see them; the
// configuration in use stays; a same-content update in a new directory
// (another key of the Secret changed) is a new generation.
func TestReloadCountsEachBadVersionOnce(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	dir := t.TempDir()
	good := strings.Replace(pgConfig, "%s", "first-secret", 1)
	path := kubeletWrite(t, dir, good)
	m := metrics.New(func() metrics.State { return metrics.State{} })
	var auditOut bytes.Buffer
	b, err := loadBackends(path, false, nil, time.Millisecond, InProcess{Reap: time.Hour}, audit.New(&auditOut), m, testSections)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	first, _ := b.reg.Get("postgres")
	check := func(gen, errs string) {
		t.Helper()
		body := scrape(t, m)
		for _, want := range []string{"ephemeral_secrets_backend_config_generation " + gen + "\n",
			"ephemeral_secrets_backend_config_reload_errors_total " + errs + "\n"} {
			if !strings.Contains(body, want) {
				t.Errorf("metrics lack %q", want)
			}
		}
	}
	b.Reload(ctx)
	check("1", "0")

	kubeletWrite(t, dir, good+"  tpyo: second-secret\n")
	for range 3 {
		b.Reload(ctx)
	}
	check("1", "1")
	if p, _ := b.reg.Get("postgres"); p != first {
		t.Errorf("a broken file replaced the provider")
	}

	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		b.Reload(ctx)
	}
	check("1", "2")

	kubeletWrite(t, dir, good)
	b.Reload(ctx)
	check("2", "2")
	if p, _ := b.reg.Get("postgres"); p == first {
		t.Errorf("the provider was not replaced")
	}
	for _, s := range []string{"first-secret", "second-secret", "tpyo"} {
		if strings.Contains(auditOut.String(), s) {
			t.Errorf("the audit log quotes the file: %s", s)
		}
	}
	if n := strings.Count(auditOut.String(), `"stage":"config"`); n != 4 {
		t.Errorf("%d config records, want 4 (load, broken, unreadable, reload):\n%s", n, auditOut.String())
	}
}

// TestOptionalBackendFileMayBeMissing: a node plugin whose issuer serves
// PostgreSQL starts without a backend file (the chart mounts its Secret
// optional) and loads the file when kubelet writes it; a required file
// that is missing stops the start.
func TestOptionalBackendFileMayBeMissing(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	path := filepath.Join(dir, "backends.yaml")
	m := metrics.New(func() metrics.State { return metrics.State{} })
	if _, err := loadBackends(path, false, nil, time.Millisecond, InProcess{Reap: time.Hour}, audit.New(io.Discard), m, testSections); err == nil {
		t.Fatal("a missing required backend file loaded")
	}
	b, err := loadBackends(path, true, nil, time.Millisecond, InProcess{Reap: time.Hour}, audit.New(io.Discard), m, testSections)
	if err != nil {
		t.Fatalf("a missing optional backend file: %v", err)
	}
	defer b.Close()
	if names := b.reg.Names(); len(names) != 0 {
		t.Fatalf("providers %v from no file", names)
	}
	b.Reload(ctx)
	if body := scrape(t, m); !strings.Contains(body, "ephemeral_secrets_backend_config_reload_errors_total 0\n") {
		t.Error("a still-missing optional file counted as a reload error")
	}
	kubeletWrite(t, dir, strings.Replace(pgConfig, "%s", "secret", 1))
	b.Reload(ctx)
	if _, ok := b.reg.Get("postgres"); !ok {
		t.Fatalf("the file written later was not loaded: %v", b.reg.Names())
	}
}
