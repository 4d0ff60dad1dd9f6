// Package kube starts a real kube-apiserver with its etcd on 127.0.0.1 for
// tests: a throwaway CA and serving certificate, a service-account signing
// key (so TokenRequest works), and an admin bearer token. The API server
// binary is built from the Go module proxy by build-kube.sh ("make
// kube"), one per version of the file versions; etcd comes from the
// distribution (etcd-server).
package kube

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	_ "embed"
	"encoding/base64"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"k8s.io/client-go/rest"

	"github.com/ephemeral-secrets/csi-driver/test/harness"
)

// AdminToken is the bearer token of the test cluster's admin (system:masters).
const AdminToken = "esc-test-admin-token"

// Options shape the API server for a cluster with nodes. The zero value
// is the API server alone, on 127.0.0.1.
type Options struct {
	// BindAddress and AdvertiseAddress default to 127.0.0.1. A cluster
	// whose pods reach the API through the kubernetes Service needs an
	// advertise address that is not loopback.
	BindAddress, AdvertiseAddress string
	// ExtraIPs are more addresses the serving certificate is valid for.
	ExtraIPs []net.IP
	// Users are more bearer-token identities (kubelet, controllers).
	Users []User
	// Nodes turns on what a cluster with a kubelet needs: Node
	// authorization, the NodeRestriction and ServiceAccount admission
	// plugins, and a client certificate to call kubelets with.
	Nodes bool
	// Version is the API server's Kubernetes version, one of Versions
	// (built by make kube); default the node's.
	Version string
}

// User is one bearer-token identity of the token file.
type User struct {
	Token, Name string
	Groups      []string
}

// Cluster is a running etcd and kube-apiserver.
type Cluster struct {
	opts     Options
	caKey    *ecdsa.PrivateKey
	caCert   *x509.Certificate
	dir      string
	etcd     *exec.Cmd
	api      *exec.Cmd
	URL      string // https://127.0.0.1:PORT
	CAPEM    []byte
	Issuer   string // the service-account token issuer (the URL)
	LogFiles []string
}

//go:embed versions
var versionsFile string

// Versions are the Kubernetes versions the tests run, from the file
// versions (make kube builds the same): node, every command of the real
// node and the default API server; oldest, an API server alone, the
// lowest minor the chart claims.
func Versions() (node, oldest string) {
	for line := range strings.Lines(versionsFile) {
		switch f := strings.Fields(line); {
		case len(f) == 2 && f[0] == "node":
			node = f[1]
		case len(f) == 2 && f[0] == "oldest":
			oldest = f[1]
		}
	}
	return node, oldest
}

// APIServerPath finds the kube-apiserver binary of version (""
// is the node's): $ESC_KUBE_APISERVER for the node's, or where
// build-kube.sh puts it (make kube).
func APIServerPath(version string) (string, error) {
	node, _ := Versions()
	if version == "" || version == node {
		if p := os.Getenv("ESC_KUBE_APISERVER"); p != "" {
			return p, nil
		}
		return Tool("kube-apiserver")
	}
	return Tool(filepath.Join("kube-"+version, "kube-apiserver"))
}

// Tool finds one of the test tools "make kube" installs.
func Tool(name string) (string, error) { return harness.Tool(name) }

// Start starts etcd and kube-apiserver and waits until the API is ready.
func Start() (*Cluster, error) { return StartWith(Options{}) }

// StartWith starts etcd and kube-apiserver shaped by opts.
func StartWith(opts Options) (*Cluster, error) {
	if opts.BindAddress == "" {
		opts.BindAddress = "127.0.0.1"
	}
	if opts.AdvertiseAddress == "" {
		opts.AdvertiseAddress = "127.0.0.1"
	}
	apiserver, err := APIServerPath(opts.Version)
	if err != nil {
		return nil, err
	}
	etcdBin, err := exec.LookPath("etcd")
	if err != nil {
		return nil, fmt.Errorf("etcd not found (apt-get install etcd-server): %w", err)
	}
	dir, err := os.MkdirTemp("", "esc-kube-")
	if err != nil {
		return nil, err
	}
	c := &Cluster{dir: dir, opts: opts}
	ok := false
	defer func() {
		if !ok {
			c.Stop()
		}
	}()
	ports, err := harness.FreePorts(3)
	if err != nil {
		return nil, err
	}
	etcdURL := fmt.Sprintf("http://127.0.0.1:%d", ports[0])
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", ports[1])
	c.etcd = exec.Command(etcdBin, "--data-dir", filepath.Join(dir, "etcd"),
		"--listen-client-urls", etcdURL, "--advertise-client-urls", etcdURL,
		"--listen-peer-urls", peerURL, "--initial-advertise-peer-urls", peerURL,
		"--initial-cluster", "default="+peerURL, "--log-level", "warn")
	if err := c.start(c.etcd, "etcd.log"); err != nil {
		return nil, err
	}

	c.URL = fmt.Sprintf("https://127.0.0.1:%d", ports[2])
	c.Issuer = c.URL
	certFile, keyFile, saPub, saKey, err := c.writeCerts()
	if err != nil {
		return nil, err
	}
	tokens := filepath.Join(dir, "tokens.csv")
	users := AdminToken + ",admin,admin-uid,system:masters\n"
	for _, u := range opts.Users {
		users += fmt.Sprintf("%s,%s,%s-uid,\"%s\"\n", u.Token, u.Name, u.Name, strings.Join(u.Groups, ","))
	}
	if err := os.WriteFile(tokens, []byte(users), 0o600); err != nil {
		return nil, err
	}
	authz, admission := []string{"--authorization-mode", "RBAC", "--disable-admission-plugins", "ServiceAccount"}, []string(nil)
	if opts.Nodes {
		cert, key, err := c.IssueCert("kube-apiserver-kubelet-client", []string{"system:masters"}, nil, false)
		if err != nil {
			return nil, err
		}
		certPath, keyPath := filepath.Join(dir, "kubelet-client.crt"), filepath.Join(dir, "kubelet-client.key")
		if err := writeFiles(map[string][]byte{certPath: cert, keyPath: key}); err != nil {
			return nil, err
		}
		authz = []string{"--authorization-mode", "Node,RBAC"}
		admission = []string{"--enable-admission-plugins", "NodeRestriction",
			"--kubelet-client-certificate", certPath, "--kubelet-client-key", keyPath,
			"--kubelet-preferred-address-types", "InternalIP,Hostname"}
	}
	args := []string{
		"--etcd-servers", etcdURL,
		"--bind-address", opts.BindAddress, "--advertise-address", opts.AdvertiseAddress,
		"--secure-port", strconv.Itoa(ports[2]),
		"--tls-cert-file", certFile, "--tls-private-key-file", keyFile,
		"--token-auth-file", tokens,
		"--service-account-issuer", c.Issuer,
		"--service-account-key-file", saPub,
		"--service-account-signing-key-file", saKey,
		"--api-audiences", c.Issuer + ",vault,sts.amazonaws.com",
		"--service-cluster-ip-range", "10.96.0.0/24",
		"--enable-priority-and-fairness=false",
		"--allow-privileged=true",
		"--cert-dir", filepath.Join(dir, "certs"),
		"--v", "1",
	}
	// 1.37 refuses to start with a loopback advertise address and the
	// endpoint reconciler; nothing reaches an API server on loopback
	// through the kubernetes Service.
	if net.ParseIP(opts.AdvertiseAddress).IsLoopback() {
		args = append(args, "--endpoint-reconciler-type", "none")
	}
	args = append(append(args, authz...), admission...)
	c.api = exec.Command(apiserver, args...)
	if err := c.start(c.api, "apiserver.log"); err != nil {
		return nil, err
	}
	if err := c.waitReady(90 * time.Second); err != nil {
		return nil, err
	}
	ok = true
	return c, nil
}

func (c *Cluster) start(cmd *exec.Cmd, logName string) error {
	path := filepath.Join(c.dir, logName)
	log, err := os.Create(path)
	if err != nil {
		return err
	}
	c.LogFiles = append(c.LogFiles, path)
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	return cmd.Start()
}

// Config is an admin client configuration.
func (c *Cluster) Config() *rest.Config {
	return &rest.Config{Host: c.URL, BearerToken: AdminToken, TLSClientConfig: rest.TLSClientConfig{CAData: c.CAPEM}}
}

func (c *Cluster) waitReady(timeout time.Duration) error {
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(c.CAPEM)
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		req, _ := http.NewRequestWithContext(context.Background(), http.MethodGet, c.URL+"/readyz", nil)
		req.Header.Set("Authorization", "Bearer "+AdminToken)
		resp, err := client.Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		if c.api.ProcessState != nil {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	log, _ := os.ReadFile(filepath.Join(c.dir, "apiserver.log"))
	if len(log) > 3000 {
		log = log[len(log)-3000:]
	}
	return fmt.Errorf("kube-apiserver not ready in %s: %s", timeout, log)
}

// Stop stops the API server and etcd and removes their files.
func (c *Cluster) Stop() {
	for _, cmd := range []*exec.Cmd{c.api, c.etcd} {
		if cmd != nil && cmd.Process != nil {
			_ = cmd.Process.Signal(syscall.SIGTERM)
			done := make(chan struct{})
			go func() { _ = cmd.Wait(); close(done) }()
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				_ = cmd.Process.Kill()
				<-done
			}
		}
	}
	_ = os.RemoveAll(c.dir)
}

// writeCerts makes a CA, a serving certificate for 127.0.0.1, and the
// service-account key pair.
func (c *Cluster) writeCerts() (certFile, keyFile, saPub, saKey string, err error) {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "esc-test-ca"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return
	}
	caCert, _ := x509.ParseCertificate(caDER)
	c.caKey, c.caCert = caKey, caCert
	c.CAPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})

	srvKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return
	}
	srvTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "kube-apiserver"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		IPAddresses: append([]net.IP{net.ParseIP("127.0.0.1")}, c.opts.ExtraIPs...),
		DNSNames:    []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"},
		KeyUsage:    x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	srvDER, err := x509.CreateCertificate(rand.Reader, srvTmpl, caCert, &srvKey.PublicKey, caKey)
	if err != nil {
		return
	}
	srvKeyDER, err := x509.MarshalECPrivateKey(srvKey)
	if err != nil {
		return
	}
	saPriv, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return
	}
	saPubDER, err := x509.MarshalPKIXPublicKey(&saPriv.PublicKey)
	if err != nil {
		return
	}
	certFile, keyFile = filepath.Join(c.dir, "serving.crt"), filepath.Join(c.dir, "serving.key")
	saPub, saKey = filepath.Join(c.dir, "sa.pub"), filepath.Join(c.dir, "sa.key")
	for path, block := range map[string]*pem.Block{
		certFile: {Type: "CERTIFICATE", Bytes: append(srvDER, []byte{}...)},
		keyFile:  {Type: "EC PRIVATE KEY", Bytes: srvKeyDER},
		saPub:    {Type: "PUBLIC KEY", Bytes: saPubDER},
		saKey:    {Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(saPriv)},
	} {
		data := pem.EncodeToMemory(block)
		if path == certFile {
			data = append(data, c.CAPEM...)
		}
		if err = os.WriteFile(path, data, 0o600); err != nil {
			return
		}
	}
	return
}

// IssueCert signs a certificate with the cluster's CA: a client
// certificate for cn in the groups orgs, or a serving certificate for ips.
func (c *Cluster) IssueCert(cn string, orgs []string, ips []net.IP, server bool) (certPEM, keyPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	serial, err := rand.Int(rand.Reader, big.NewInt(1<<62))
	if err != nil {
		return nil, nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial, Subject: pkix.Name{CommonName: cn, Organization: orgs},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	if server {
		tmpl.ExtKeyUsage, tmpl.IPAddresses = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, ips
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.caCert, &key.PublicKey, c.caKey)
	if err != nil {
		return nil, nil, err
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), nil
}

// Dir is the cluster's working directory (certificates, logs).
func (c *Cluster) Dir() string { return c.dir }

// SAKeyFile is the service-account signing key (the controller manager
// signs legacy tokens with it).
func (c *Cluster) SAKeyFile() string { return filepath.Join(c.dir, "sa.key") }

// Kubeconfig writes a kubeconfig for a bearer token to path, with server
// as the API's address (default: the URL the cluster listens on).
func (c *Cluster) Kubeconfig(path, server, token string) error {
	if server == "" {
		server = c.URL
	}
	doc := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: esc
  cluster:
    server: %s
    certificate-authority-data: %s
users:
- name: esc
  user:
    token: %s
contexts:
- name: esc
  context: {cluster: esc, user: esc}
current-context: esc
`, server, base64.StdEncoding.EncodeToString(c.CAPEM), token)
	return os.WriteFile(path, []byte(doc), 0o600)
}

func writeFiles(files map[string][]byte) error {
	for path, data := range files {
		if err := os.WriteFile(path, data, 0o600); err != nil {
			return err
		}
	}
	return nil
}
