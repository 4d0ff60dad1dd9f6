package vault

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/test/standin"
)

// seen counts connections and requests together: a refused class must
// cause neither.
func seen(s *standin.Server) int {
	c, r, _ := s.Seen()
	return c + r
}

func issueReq(params map[string]string) provider.Request {
	p := map[string]string{"roleName": "app", "objects": "- {objectName: a, secretPath: secret/data/a}"}
	for k, v := range params {
		p[k] = v
	}
	return provider.Request{
		LeaseID: "l-1", Class: "team-a/c", Params: p,
		Pod: provider.Pod{Namespace: "team-a", Name: "p", UID: "u", ServiceAccount: "sa"},
		Tokens: map[string]provider.Token{"vault": {Token: standin.Token("team-a", "sa", "u", "vault")},
			"sts.amazonaws.com": {Token: standin.Token("team-a", "sa", "u", "sts.amazonaws.com")}},
	}
}

// A class can neither name trust files nor turn verification off nor pick
// the token's audience: refused with InvalidArgument, saying what the
// admin configures, naming no path, before the address is dialled.
func TestClassCannotChooseTrust(t *testing.T) {
	vs := standin.New(t, true)
	p, err := New(Config{Addresses: []string{vs.URL}, TLS: map[string]provider.TLS{vs.URL: {CACert: vs.CAFile}},
		TLSProfiles: map[string]TLSProfile{"team-b": {Namespaces: []string{"team-b"}}}})
	if err != nil {
		t.Fatal(err)
	}
	const path = "/var/lib/kubelet/pki/kubelet-client-current.pem"
	for _, tc := range []struct {
		name   string
		params map[string]string
		want   error
		says   string
	}{
		{"CA file", map[string]string{CACertParam: path}, provider.ErrInvalidParameters, "vault.tls"},
		{"CA file /dev/zero", map[string]string{CACertParam: "/dev/zero"}, provider.ErrInvalidParameters, "vault.tls"},
		{"CA directory", map[string]string{CADirParam: "/etc"}, provider.ErrInvalidParameters, "vault.tls"},
		{"client cert", map[string]string{ClientCertParam: path, ClientKeyParam: path}, provider.ErrInvalidParameters, "vault.tls"},
		{"client key", map[string]string{ClientKeyParam: path}, provider.ErrInvalidParameters, "vault.tls"},
		{"skip verify", map[string]string{SkipTLSVerifyParam: "true"}, provider.ErrInvalidParameters, "insecureSkipVerify"},
		{"skip verify 1", map[string]string{SkipTLSVerifyParam: "1"}, provider.ErrInvalidParameters, "insecureSkipVerify"},
		{"server name", map[string]string{TLSServerNameParam: "kubernetes.default"}, provider.ErrInvalidParameters, "serverName"},
		{"audience", map[string]string{AudienceParam: "sts.amazonaws.com"}, provider.ErrInvalidParameters, `"vault"`},
		{"unknown profile", map[string]string{TLSProfileParam: "nope"}, provider.ErrInvalidParameters, "team-b"},
		{"another namespace's profile", map[string]string{TLSProfileParam: "team-b"}, provider.ErrPermissionDenied, "team-a"},
		{"address off the list", map[string]string{AddressParam: "https://127.0.0.1:1"}, provider.ErrPermissionDenied, "admin's Vault addresses"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := seen(vs)
			_, err := p.Issue(context.Background(), issueReq(tc.params))
			if !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
			if !strings.Contains(err.Error(), tc.says) {
				t.Errorf("error %q does not say %q", err, tc.says)
			}
			if strings.Contains(err.Error(), "/dev/zero") || strings.Contains(err.Error(), path) || strings.Contains(err.Error(), "/etc") {
				t.Errorf("error quotes a path: %v", err)
			}
			if n := seen(vs) - before; n != 0 {
				t.Errorf("%d connections to Vault for a refused class", n)
			}
		})
	}
	// What a carried-over class says that asks for nothing: accepted, and
	// it reaches Vault over the admin's trust (Vault then refuses the role).
	for _, params := range []map[string]string{
		{SkipTLSVerifyParam: "false"}, {AudienceParam: "vault"}, {AddressParam: vs.URL + "/"},
	} {
		before := seen(vs)
		if _, err := p.Issue(context.Background(), issueReq(params)); !errors.Is(err, provider.ErrPermissionDenied) {
			t.Errorf("%v: %v, want Vault's refusal", params, err)
		}
		if seen(vs) == before {
			t.Errorf("%v: Vault was not reached", params)
		}
	}
}

// Verification is on unless the admin turns it off: without the admin's
// CA the handshake fails and no token is sent; with it, the login reaches
// Vault; the client certificate presented is the admin's only.
func TestTrustIsTheAdmins(t *testing.T) {
	vs := standin.New(t, true)
	unverified, err := New(Config{Addresses: []string{vs.URL}})
	if err != nil {
		t.Fatal(err)
	}
	_, err = unverified.Issue(context.Background(), issueReq(nil))
	if !errors.Is(err, provider.ErrUnavailable) || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("a server no CA vouches for: %v, want Unavailable for its certificate", err)
	}
	skip, err := New(Config{Addresses: []string{vs.URL}, TLS: map[string]provider.TLS{vs.URL: {InsecureSkipVerify: true}}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := skip.Issue(context.Background(), issueReq(nil)); !errors.Is(err, provider.ErrPermissionDenied) {
		t.Fatalf("the admin's insecureSkipVerify: %v, want Vault's refusal", err)
	}

	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "c.pem"), filepath.Join(dir, "k.pem")
	cert, key := standin.ClientPair(t, "admin-client")
	if err := os.WriteFile(certFile, cert, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, key, 0o600); err != nil {
		t.Fatal(err)
	}
	withCert, err := New(Config{Addresses: []string{vs.URL},
		TLS:         map[string]provider.TLS{vs.URL: {CACert: vs.CAFile}},
		TLSProfiles: map[string]TLSProfile{"team-a": {TLS: provider.TLS{CACert: vs.CAFile, ClientCert: certFile, ClientKey: keyFile}, Namespaces: []string{"team-a"}}}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := withCert.Issue(context.Background(), issueReq(nil)); !errors.Is(err, provider.ErrPermissionDenied) {
		t.Fatalf("admin CA: %v", err)
	}
	if _, err := withCert.Issue(context.Background(), issueReq(map[string]string{TLSProfileParam: "team-a"})); !errors.Is(err, provider.ErrPermissionDenied) {
		t.Fatalf("admin profile: %v", err)
	}
	if _, _, certs := vs.Seen(); len(certs) != 1 || certs[0] != "admin-client" {
		t.Errorf("client certificates presented: %v, want the profile's only", certs)
	}
}

// The admin's trust files are read with a bound, at configuration load:
// a device, a FIFO or a huge file is refused without reading it all (or
// blocking), and the error names the setting, not the content.
func TestTrustFilesAreBounded(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	big := filepath.Join(dir, "big")
	if err := os.WriteFile(big, make([]byte, provider.MaxTrustFileBytes+1), 0o600); err != nil {
		t.Fatal(err)
	}
	garbage := filepath.Join(dir, "garbage")
	if err := os.WriteFile(garbage, []byte("not-a-pem-SECRETISH"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"/dev/zero", fifo, big, dir, garbage, filepath.Join(dir, "missing")} {
		_, err := New(Config{Addresses: []string{"https://vault:8200"}, TLS: map[string]provider.TLS{"https://vault:8200": {CACert: f}}})
		if err == nil {
			t.Errorf("%s accepted as a CA", f)
			continue
		}
		if !strings.Contains(err.Error(), "caCert") || strings.Contains(err.Error(), "SECRETISH") {
			t.Errorf("%s: %v", f, err)
		}
	}
	if _, err := New(Config{Addresses: []string{"https://vault:8200"}, TLS: map[string]provider.TLS{"https://other:8200": {}}}); err == nil {
		t.Error("TLS for an address not on the list accepted")
	}
}

// A redirect from the admin's Vault is not followed: the pod's token goes
// to the listed address only.
func TestRedirectsAreNotFollowed(t *testing.T) {
	elsewhere := standin.NewTCP(t)
	redirecting := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, elsewhere.URL("http")+r.URL.Path, http.StatusTemporaryRedirect)
	}))
	defer redirecting.Close()
	p, err := New(Config{Addresses: []string{redirecting.URL}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Issue(context.Background(), issueReq(map[string]string{AddressParam: redirecting.URL})); err == nil {
		t.Fatal("a redirected login succeeded")
	}
	if n := elsewhere.Seen(); n != 0 {
		t.Fatalf("%d connections to the redirect's target", n)
	}
}
