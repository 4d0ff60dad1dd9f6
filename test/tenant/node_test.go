package tenant

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
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
	"unsafe"

	"golang.org/x/sys/unix"
)

// canaries are root-only files planted where a class might point the
// driver, watched with inotify for any open or read.
type canaries struct {
	fd      int
	watches map[int32]string
	// KubeletCert is the kubelet's client certificate and key (CN
	// system:node:test-node), OtherPodKey another pod's TLS key,
	// BackendsCopy a root-only copy of a backend configuration, CADir a
	// directory of CA files.
	KubeletCert, OtherPodKey, BackendsCopy, CADir string
}

func plantCanaries(t *testing.T, base, kubeletDir string) *canaries {
	t.Helper()
	c := &canaries{watches: map[int32]string{},
		KubeletCert:  filepath.Join(kubeletDir, "pki", "kubelet-client-current.pem"),
		OtherPodKey:  filepath.Join(kubeletDir, "pods", "5f0c2a1e-0000-4000-8000-00000000beef", "volumes", "kubernetes.io~secret", "tls", "tls.key"),
		BackendsCopy: filepath.Join(base, "etc", "backends-copy.yaml"),
		CADir:        filepath.Join(base, "etc", "ca"),
	}
	cert, key := selfSigned(t, "system:node:test-node", false)
	for path, data := range map[string][]byte{
		c.KubeletCert:                    append(cert, key...),
		c.OtherPodKey:                    key,
		c.BackendsCopy:                   []byte("postgres: {connections: {main: {url: postgres://admin:CANARY-ADMIN-PASSWORD@db/}}}\n"),
		filepath.Join(c.CADir, "ca.pem"): cert,
	} {
		if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	var err error
	if c.fd, err = unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(c.fd) })
	for _, p := range []string{c.KubeletCert, c.OtherPodKey, c.BackendsCopy, c.CADir, filepath.Join(c.CADir, "ca.pem"),
		filepath.Dir(c.KubeletCert), filepath.Dir(c.OtherPodKey)} {
		wd, err := unix.InotifyAddWatch(c.fd, p, unix.IN_OPEN|unix.IN_ACCESS)
		if err != nil {
			t.Fatal(err)
		}
		c.watches[int32(wd)] = p
	}
	return c
}

// opened drains the events seen since the last call and returns the
// paths opened or read.
func (c *canaries) opened() []string {
	var out []string
	buf := make([]byte, 64<<10)
	for {
		n, err := unix.Read(c.fd, buf)
		if n <= 0 || err != nil {
			return out
		}
		for off := 0; off+unix.SizeofInotifyEvent <= n; {
			ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
			out = append(out, c.watches[ev.Wd])
			off += unix.SizeofInotifyEvent + int(ev.Len)
		}
	}
}

// selfSigned makes a certificate and key (PEM); server certificates are
// for 127.0.0.1.
func selfSigned(t *testing.T, cn string, server bool) (certPEM, keyPEM []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth}}
	if server {
		tmpl.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1)}
		tmpl.IsCA, tmpl.BasicConstraintsValid, tmpl.KeyUsage = true, true, x509.KeyUsageCertSign|x509.KeyUsageDigitalSignature
	}
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

// standIn is a local listener standing in for Vault or STS: it records
// connections, requests and the client certificates presented, and
// refuses every request with 403 as the real server refuses a stranger.
type standIn struct {
	srv         *httptest.Server
	URL         string
	CAFile      string // the admin's CA for it (TLS only)
	mu          sync.Mutex
	conns, reqs int
	clientCerts []string
}

func newStandIn(t *testing.T, dir string, useTLS bool) *standIn {
	t.Helper()
	s := &standIn{}
	s.srv = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		s.reqs++
		if r.TLS != nil {
			for _, c := range r.TLS.PeerCertificates {
				s.clientCerts = append(s.clientCerts, c.Subject.CommonName)
			}
		}
		s.mu.Unlock()
		if strings.HasPrefix(r.Header.Get("Content-Type"), "application/x-www-form-urlencoded") {
			// STS's query protocol
			w.Header().Set("Content-Type", "text/xml")
			w.WriteHeader(http.StatusForbidden)
			_, _ = w.Write([]byte(`<ErrorResponse><Error><Type>Sender</Type><Code>AccessDenied</Code><Message>not for you</Message></Error><RequestId>1</RequestId></ErrorResponse>`))
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusForbidden)
		_, _ = w.Write([]byte(`{"errors":["permission denied"]}`))
	}))
	s.srv.Config.ConnState = func(_ net.Conn, st http.ConnState) {
		if st == http.StateNew {
			s.mu.Lock()
			s.conns++
			s.mu.Unlock()
		}
	}
	if useTLS {
		cert, key := selfSigned(t, "stand-in", true)
		pair, err := tls.X509KeyPair(cert, key)
		if err != nil {
			t.Fatal(err)
		}
		s.srv.TLS = &tls.Config{Certificates: []tls.Certificate{pair}, ClientAuth: tls.RequestClientCert}
		s.srv.StartTLS()
		s.CAFile = filepath.Join(dir, "stand-in-ca-"+time.Now().Format("150405.000000000")+".pem")
		if err := os.WriteFile(s.CAFile, cert, 0o600); err != nil {
			t.Fatal(err)
		}
	} else {
		s.srv.Start()
	}
	s.URL = s.srv.URL
	t.Cleanup(s.srv.Close)
	return s
}

// seen returns the connections and requests so far, and the client
// certificates presented.
func (s *standIn) seen() (conns, reqs int, certs []string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.conns, s.reqs, append([]string(nil), s.clientCerts...)
}

// tcpRecorder is an address on no list: it counts the connections made to it.
type tcpRecorder struct {
	l     net.Listener
	mu    sync.Mutex
	count int
}

func newTCPRecorder(t *testing.T) *tcpRecorder {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &tcpRecorder{l: l}
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

func (r *tcpRecorder) URL(scheme string) string { return scheme + "://" + r.l.Addr().String() }

func (r *tcpRecorder) seen() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.count
}

// peakRSS is the driver process's peak resident memory (VmHWM), in bytes.
func peakRSS(t *testing.T, pid int) int64 {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		var kb int64
		if _, err := fmt.Sscanf(line, "VmHWM: %d kB", &kb); err == nil {
			return kb << 10
		}
	}
	t.Fatal("no VmHWM in /proc/<pid>/status")
	return 0
}
