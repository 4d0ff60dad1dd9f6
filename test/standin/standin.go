// Package standin gives tests local listeners standing in for a backend
// (Vault, STS) or for an address on no list: they record every
// connection, request and client certificate, and refuse every request
// as the real server refuses a stranger, so that a test can say what was
// dialled, sent and presented.
package standin

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// Server is an HTTP(S) server standing in for Vault or STS. Vault gets
// 403 with Vault's JSON errors, STS (its form-encoded query protocol)
// AccessDenied in STS's XML.
type Server struct {
	URL string
	// CAFile is a PEM file of the CA that vouches for it (TLS only): the
	// admin's trust material. Every TLS stand-in has httptest's one
	// certificate, so this file vouches for all of them: give it only for
	// the address meant to be trusted.
	CAFile string

	srv         *httptest.Server
	mu          sync.Mutex
	conns, reqs int
	clientCerts []string
}

// New starts a stand-in, over TLS (asking for client certificates) or
// plain HTTP, stopped when the test ends.
func New(t testing.TB, useTLS bool) *Server {
	t.Helper()
	s := &Server{}
	s.srv = httptest.NewUnstartedServer(http.HandlerFunc(s.serve))
	s.srv.Config.ConnState = func(_ net.Conn, st http.ConnState) {
		if st == http.StateNew {
			s.mu.Lock()
			s.conns++
			s.mu.Unlock()
		}
	}
	if useTLS {
		s.srv.TLS = &tls.Config{ClientAuth: tls.RequestClientCert}
		s.srv.StartTLS()
		s.CAFile = filepath.Join(t.TempDir(), "ca.pem")
		ca := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: s.srv.Certificate().Raw})
		if err := os.WriteFile(s.CAFile, ca, 0o600); err != nil {
			t.Fatal(err)
		}
	} else {
		s.srv.Start()
	}
	s.URL = s.srv.URL
	t.Cleanup(s.srv.Close)
	return s
}

func (s *Server) serve(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	s.reqs++
	if r.TLS != nil {
		for _, c := range r.TLS.PeerCertificates {
			s.clientCerts = append(s.clientCerts, c.Subject.CommonName)
		}
	}
	s.mu.Unlock()
	if strings.HasPrefix(r.Header.Get("Content-Type"), "application/x-www-form-urlencoded") {
		w.Header().Set("Content-Type", "text/xml")
		w.WriteHeader(http.StatusForbidden)
		_, _ = w.Write([]byte(`<ErrorResponse><Error><Type>Sender</Type><Code>AccessDenied</Code><Message>not for you</Message></Error><RequestId>1</RequestId></ErrorResponse>`))
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusForbidden)
	_, _ = w.Write([]byte(`{"errors":["permission denied"]}`))
}

// Seen returns the connections and requests so far, and the common names
// of the client certificates presented.
func (s *Server) Seen() (conns, reqs int, clientCerts []string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.conns, s.reqs, append([]string(nil), s.clientCerts...)
}

// TCP is an address on no list: it counts the connections made to it.
type TCP struct {
	l     net.Listener
	mu    sync.Mutex
	count int
}

// NewTCP listens on a free port of 127.0.0.1 until the test ends.
func NewTCP(t testing.TB) *TCP {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &TCP{l: l}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			r.mu.Lock()
			r.count++
			r.mu.Unlock()
			c.Close()
		}
	}()
	t.Cleanup(func() { l.Close() })
	return r
}

// URL is the address with a scheme.
func (r *TCP) URL(scheme string) string { return scheme + "://" + r.l.Addr().String() }

// Seen is the number of connections so far.
func (r *TCP) Seen() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.count
}

// ClientPair makes a self-signed client certificate with common name cn,
// and its key, in PEM.
func ClientPair(t testing.TB, cn string) (certPEM, keyPEM []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder})
}

// Token is a service-account token as kubelet requests it for a CSI
// driver, for service account sa of namespace ns, bound to the pod with
// podUID (none when empty), for audience: a JWT whose claims say so,
// unsigned (a stand-in does not verify it; real backends get real tokens).
func Token(ns, sa, podUID, audience string) string {
	enc := func(v any) string {
		b, _ := json.Marshal(v)
		return base64.RawURLEncoding.EncodeToString(b)
	}
	k8s := map[string]any{"namespace": ns, "serviceaccount": map[string]string{"name": sa}}
	if podUID != "" {
		k8s["pod"] = map[string]string{"name": "p", "uid": podUID}
	}
	claims := map[string]any{
		"iss": "https://kubernetes.default.svc", "sub": "system:serviceaccount:" + ns + ":" + sa, "aud": []string{audience},
		"exp": time.Now().Add(time.Hour).Unix(), "kubernetes.io": k8s,
	}
	return enc(map[string]string{"alg": "none", "typ": "JWT"}) + "." + enc(claims) + ".c2lnbmF0dXJl"
}
