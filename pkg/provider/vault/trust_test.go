package vault

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// vaultStandIn is a TLS listener standing in for Vault: it counts
// connections, records the client certificates presented and refuses
// every login with 403, as Vault refuses a bad role.
type vaultStandIn struct {
	*httptest.Server
	mu          sync.Mutex
	conns, reqs int
	clientCerts []string
	caFile      string
}

func newVaultStandIn(t *testing.T) *vaultStandIn {
	s := &vaultStandIn{}
	s.Server = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		s.reqs++
		if r.TLS != nil {
			for _, c := range r.TLS.PeerCertificates {
				s.clientCerts = append(s.clientCerts, c.Subject.CommonName)
			}
		}
		s.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusForbidden)
		_, _ = w.Write([]byte(`{"errors":["permission denied"]}`))
	}))
	s.Config.ConnState = func(_ net.Conn, st http.ConnState) {
		if st == http.StateNew {
			s.mu.Lock()
			s.conns++
			s.mu.Unlock()
		}
	}
	s.TLS = &tls.Config{ClientAuth: tls.RequestClientCert}
	s.StartTLS()
	t.Cleanup(s.Close)
	s.caFile = filepath.Join(t.TempDir(), "ca.pem")
	ca := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: s.Certificate().Raw})
	if err := os.WriteFile(s.caFile, ca, 0o600); err != nil {
		t.Fatal(err)
	}
	return s
}

// connections counts connections and requests together: a refused class
// must cause neither.
func (s *vaultStandIn) connections() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.conns + s.reqs
}

func issueReq(params map[string]string) provider.Request {
	p := map[string]string{"roleName": "app", "objects": "- {objectName: a, secretPath: secret/data/a}"}
	for k, v := range params {
		p[k] = v
	}
	return provider.Request{
		LeaseID: "l-1", Class: "team-a/c", Params: p,
		Pod:    provider.Pod{Namespace: "team-a", Name: "p", UID: "u", ServiceAccount: "sa"},
		Tokens: map[string]provider.Token{"vault": {Token: "pod-vault-token"}, "sts.amazonaws.com": {Token: "pod-sts-token"}},
	}
}

// A class can neither name trust files nor turn verification off nor pick
// the token's audience: refused with InvalidArgument, saying what the
// admin configures, naming no path, before the address is dialled.
func TestClassCannotChooseTrust(t *testing.T) {
	vs := newVaultStandIn(t)
	p, err := New(Config{Addresses: []string{vs.URL}, TLS: map[string]provider.TLS{vs.URL: {CACert: vs.caFile}},
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
			before := vs.connections()
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
			if n := vs.connections() - before; n != 0 {
				t.Errorf("%d connections to Vault for a refused class", n)
			}
		})
	}
	// What a carried-over class says that asks for nothing: accepted, and
	// it reaches Vault over the admin's trust (Vault then refuses the role).
	for _, params := range []map[string]string{
		{SkipTLSVerifyParam: "false"}, {AudienceParam: "vault"}, {AddressParam: vs.URL + "/"},
	} {
		before := vs.connections()
		if _, err := p.Issue(context.Background(), issueReq(params)); !errors.Is(err, provider.ErrPermissionDenied) {
			t.Errorf("%v: %v, want Vault's refusal", params, err)
		}
		if vs.connections() == before {
			t.Errorf("%v: Vault was not reached", params)
		}
	}
}

// Verification is on unless the admin turns it off: without the admin's
// CA the handshake fails and no token is sent; with it, the login reaches
// Vault; the client certificate presented is the admin's only.
func TestTrustIsTheAdmins(t *testing.T) {
	vs := newVaultStandIn(t)
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
	writeClientPair(t, certFile, keyFile, "admin-client")
	withCert, err := New(Config{Addresses: []string{vs.URL},
		TLS:         map[string]provider.TLS{vs.URL: {CACert: vs.caFile}},
		TLSProfiles: map[string]TLSProfile{"team-a": {TLS: provider.TLS{CACert: vs.caFile, ClientCert: certFile, ClientKey: keyFile}, Namespaces: []string{"team-a"}}}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := withCert.Issue(context.Background(), issueReq(nil)); !errors.Is(err, provider.ErrPermissionDenied) {
		t.Fatalf("admin CA: %v", err)
	}
	if _, err := withCert.Issue(context.Background(), issueReq(map[string]string{TLSProfileParam: "team-a"})); !errors.Is(err, provider.ErrPermissionDenied) {
		t.Fatalf("admin profile: %v", err)
	}
	vs.mu.Lock()
	defer vs.mu.Unlock()
	if len(vs.clientCerts) != 1 || vs.clientCerts[0] != "admin-client" {
		t.Errorf("client certificates presented: %v, want the profile's only", vs.clientCerts)
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

func writeClientPair(t *testing.T, certFile, keyFile, cn string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), 0o600); err != nil {
		t.Fatal(err)
	}
}
