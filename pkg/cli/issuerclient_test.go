package cli

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/audit"
	"github.com/ephemeral-secrets/csi-driver/pkg/metrics"
)

// A node plugin with --issuer-address needs the issuer's signer from
// somewhere, and refuses a postgres section of its own.
func TestIssuerClientFlags(t *testing.T) {
	for _, f := range []issuerClientFlags{
		{address: "https://issuer.esc.svc:443"},
		{address: "https://issuer.esc.svc:443", caFile: "/ca.crt", caConfigMap: "esc/ca"},
		{address: "https://issuer.esc.svc:443", caConfigMap: "esc/ca"}, // no API here
		{address: "http://issuer.esc.svc:443", caFile: "/ca.crt"},
	} {
		t.Setenv("KUBERNETES_SERVICE_HOST", "")
		if r, err := f.registerIssuer("", "test"); err == nil || r != nil {
			t.Errorf("%+v: accepted", f)
		}
	}
	f := issuerClientFlags{address: "https://issuer.esc.svc:443", caFile: "/ca.crt", tokenFile: "/token"}
	r, err := f.registerIssuer("", "test")
	if err != nil || r == nil {
		t.Fatalf("valid flags: %v", err)
	}
	load := func(content string) (*backends, error) {
		path := filepath.Join(t.TempDir(), "backends.yaml")
		if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		m := metrics.New(func() metrics.State { return metrics.State{} })
		return loadBackends(path, false, []Register{r}, time.Millisecond, InProcess{Reap: time.Hour}, audit.New(io.Discard), m, nil)
	}
	if _, err := load(fmt.Sprintf(pgConfig, "pw")); err == nil || !strings.Contains(err.Error(), "admin credential belongs to the issuer") {
		t.Errorf("a postgres section beside the issuer: %v", err)
	}
	b, err := load("{}\n")
	if err != nil {
		t.Fatalf("the issuer alone: %v", err)
	}
	defer b.Close()
	if _, ok := b.reg.Get("postgres"); !ok {
		t.Error("no postgres provider through the issuer")
	}
}
