package remote_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/ephemeral-secrets/csi-driver/pkg/issuer"
	"github.com/ephemeral-secrets/csi-driver/pkg/issuer/remote"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider/postgres"
	"github.com/ephemeral-secrets/csi-driver/test/freeport"
	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/issuertest"
	"github.com/ephemeral-secrets/csi-driver/test/kube"
)

var (
	cluster *kube.Cluster
	admin   *kubernetes.Clientset
	objs    issuertest.Cluster
	// reviews counts the TokenReviews the issuer's client sends.
	reviews atomic.Int64
)

func TestMain(m *testing.M) { os.Exit(run(m)) }

func run(m *testing.M) int {
	var err error
	if cluster, err = kube.Start(); err != nil {
		fmt.Println(err)
		return 1
	}
	defer cluster.Stop()
	if admin, err = kubernetes.NewForConfig(cluster.Config()); err != nil {
		fmt.Println(err)
		return 1
	}
	objs = issuertest.Cluster{CS: admin}
	return m.Run()
}

// recorder is the Authority behind the transport in these tests: it
// records who asked and answers what the lease ID says.
type recorder struct {
	mu      sync.Mutex
	callers []issuer.Caller
}

// errs are the answers by lease ID.
var errs = map[string]error{
	"denied":    fmt.Errorf("%w: not yours", provider.ErrPermissionDenied),
	"invalid":   fmt.Errorf("%w: no such role", provider.ErrInvalidParameters),
	"down":      fmt.Errorf("%w: database restarting", provider.ErrUnavailable),
	"misconfig": fmt.Errorf("%w: statement 1 failed", provider.ErrMisconfigured),
	"maxed":     fmt.Errorf("%w: maxTTL reached", provider.ErrNotRenewable),
	"internal":  errors.New("something unexpected"),
}

func (a *recorder) answer(c issuer.Caller, lease string) error {
	a.mu.Lock()
	a.callers = append(a.callers, c)
	a.mu.Unlock()
	return errs[lease]
}

func (a *recorder) Mint(_ context.Context, c issuer.Caller, r postgres.MintRequest) (postgres.Grant, error) {
	if r.LeaseID == "quote" { // an error that quotes the verifier must not carry it over the wire
		return postgres.Grant{}, fmt.Errorf("%w: CREATE ROLE x PASSWORD '%s' failed", provider.ErrMisconfigured, r.Verifier)
	}
	if err := a.answer(c, r.LeaseID); err != nil {
		return postgres.Grant{}, err
	}
	return postgres.Grant{Name: postgres.RoleName(r.LeaseID), Role: "main/app", Host: "db", Port: "5432", Database: "app",
		IssuedAt: time.Unix(1000, 0).UTC(), ExpiresAt: time.Unix(2000, 0).UTC(), NotAfter: time.Unix(3000, 0).UTC()}, nil
}

func (a *recorder) Extend(_ context.Context, c issuer.Caller, r postgres.ExtendRequest) (postgres.Grant, error) {
	if err := a.answer(c, r.LeaseID); err != nil {
		return postgres.Grant{}, err
	}
	return postgres.Grant{Name: r.Name, ExpiresAt: r.ExpiresAt.Add(time.Hour)}, nil
}

func (a *recorder) Drop(_ context.Context, c issuer.Caller, r postgres.DropRequest) error {
	return a.answer(c, r.LeaseID)
}

func (a *recorder) last() issuer.Caller {
	a.mu.Lock()
	defer a.mu.Unlock()
	if len(a.callers) == 0 {
		return issuer.Caller{}
	}
	return a.callers[len(a.callers)-1]
}

// env is an issuer transport serving a recorder on localhost, with its
// certificate made in the cluster.
type env struct {
	auth *recorder
	url  string
	port int
	ns   string
	stop func()
}

func start(t *testing.T, ns string) *env {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	if err := objs.Namespace(ctx, ns, "issuer"); err != nil {
		t.Fatal(err)
	}
	cfg := rest.CopyConfig(cluster.Config())
	cfg.WrapTransport = func(rt http.RoundTripper) http.RoundTripper {
		return roundTripper(func(r *http.Request) (*http.Response, error) {
			if strings.HasSuffix(r.URL.Path, "/tokenreviews") {
				reviews.Add(1)
			}
			return rt.RoundTrip(r)
		})
	}
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	certs, err := remote.NewCerts(cs, remote.CertOptions{Namespace: ns, Secret: "issuer-tls", ConfigMap: "issuer-ca", DNSNames: []string{"localhost", "issuer." + ns + ".svc"}})
	if err != nil {
		t.Fatal(err)
	}
	if err := certs.Ensure(ctx); err != nil {
		t.Fatal(err)
	}
	tr, err := remote.NewTokenReviewer(cs.AuthenticationV1().TokenReviews(), remote.ReviewOptions{
		Namespace: issuertest.DriverNamespace, ServiceAccount: issuertest.DriverServiceAccount})
	if err != nil {
		t.Fatal(err)
	}
	e := &env{auth: &recorder{}, ns: ns}
	srv := remote.NewServer(remote.ServerOptions{Authority: e.auth, Authenticator: tr})
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e.port = l.Addr().(*net.TCPAddr).Port
	e.url = fmt.Sprintf("https://localhost:%d", e.port)
	sctx, stop := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(sctx, l, certs.GetCertificate) }()
	e.stop = func() { stop(); <-done }
	t.Cleanup(e.stop)
	return e
}

type roundTripper func(*http.Request) (*http.Response, error)

func (f roundTripper) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// client is a node plugin's client presenting token.
func (e *env) client(t *testing.T, token string) *remote.Client {
	t.Helper()
	return e.clientTrusting(t, token, e.ns)
}

// clientTrusting is a client trusting the signer of the issuer of ns.
func (e *env) clientTrusting(t *testing.T, token, ns string) *remote.Client {
	t.Helper()
	path, err := issuertest.WriteToken(t.TempDir(), "token", token)
	if err != nil {
		t.Fatal(err)
	}
	c, err := remote.NewClient(remote.ClientOptions{URL: e.url, TokenFile: path, Roots: remote.RootsConfigMap(admin, ns, "issuer-ca")})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func driverToken(t *testing.T, node, audience string) string {
	t.Helper()
	ctx := context.Background()
	pod, err := objs.Node(ctx, node)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := objs.Token(ctx, pod, audience)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

const verifier = "SCRAM-SHA-256$4096:c2FsdHNhbHRzYWx0$c3RvcmVka2V5:c2VydmVya2V5"

func mint(c *remote.Client, lease string) (postgres.Grant, error) {
	return c.Mint(context.Background(), postgres.MintRequest{LeaseID: lease, VolumeID: "csi-1", Class: "t/c",
		Params: map[string]string{"connection": "main", "role": "app"}, Verifier: verifier,
		Pod: provider.Pod{Namespace: "t", Name: "p", UID: "u", ServiceAccount: "app"}})
}

func TestCallerIsTheTokensNode(t *testing.T) {
	e := start(t, "issuer-node")
	c := e.client(t, driverToken(t, "node-a", remote.Audience))
	g, err := mint(c, "lease-1")
	if err != nil {
		t.Fatal(err)
	}
	if g.Name != postgres.RoleName("lease-1") || !g.ExpiresAt.Equal(time.Unix(2000, 0)) || g.Database != "app" {
		t.Errorf("grant did not cross the wire whole: %+v", g)
	}
	if got := e.auth.last(); got.Node != "node-a" {
		t.Errorf("caller = %+v, want node-a", got)
	}
	ext, err := c.Extend(context.Background(), postgres.ExtendRequest{LeaseID: "lease-1", Name: g.Name, ExpiresAt: g.ExpiresAt})
	if err != nil || !ext.ExpiresAt.Equal(g.ExpiresAt.Add(time.Hour)) {
		t.Errorf("extend = %+v, %v", ext, err)
	}
	if err := c.Drop(context.Background(), postgres.DropRequest{LeaseID: "lease-1", Name: g.Name}); err != nil {
		t.Errorf("drop: %v", err)
	}
	// Another node's token: another caller, whatever the request says.
	c2 := e.client(t, driverToken(t, "node-b", remote.Audience))
	if _, err := mint(c2, "lease-2"); err != nil {
		t.Fatal(err)
	}
	if got := e.auth.last(); got.Node != "node-b" {
		t.Errorf("caller = %+v, want node-b", got)
	}
}

func TestRefusedCallers(t *testing.T) {
	e := start(t, "issuer-refused")
	ctx := context.Background()
	// A tenant pod's token, bound to a pod on a node: not the driver.
	if err := objs.Namespace(ctx, "tenant", "app"); err != nil {
		t.Fatal(err)
	}
	if _, err := objs.Node(ctx, "node-a"); err != nil {
		t.Fatal(err)
	}
	if _, _, err := objs.TenantPod(ctx, "tenant", "app-pod", "app", "node-a", "orders-db"); err != nil {
		t.Fatal(err)
	}
	tenantTok, err := objs.PodToken(ctx, "tenant", "app-pod", remote.Audience)
	if err != nil {
		t.Fatal(err)
	}
	unbound, err := objs.UnboundToken(ctx, issuertest.DriverNamespace, issuertest.DriverServiceAccount, remote.Audience)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, token string
		want        error
	}{
		{"another service account", tenantTok, provider.ErrPermissionDenied},
		{"the driver's token without a node", unbound, provider.ErrPermissionDenied},
		{"another audience", driverToken(t, "node-a", "vault"), provider.ErrMisconfigured},
		{"no token", " ", provider.ErrMisconfigured},
		{"garbage", "not-a-token", provider.ErrMisconfigured},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := len(e.auth.callers)
			_, err := mint(e.client(t, tc.token), "lease-x")
			if !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
			if len(e.auth.callers) != before {
				t.Error("the authority was asked for a refused caller")
			}
		})
	}
}

func TestErrorsMapBack(t *testing.T) {
	e := start(t, "issuer-errors")
	c := e.client(t, driverToken(t, "node-a", remote.Audience))
	for lease, want := range errs {
		t.Run(lease, func(t *testing.T) {
			_, err := mint(c, lease)
			if err == nil {
				t.Fatal("no error")
			}
			for _, s := range []error{provider.ErrPermissionDenied, provider.ErrInvalidParameters, provider.ErrUnavailable,
				provider.ErrMisconfigured, provider.ErrNotRenewable} {
				if errors.Is(want, s) != errors.Is(err, s) {
					t.Errorf("err = %v: errors.Is(%v) = %v, want %v", err, s, errors.Is(err, s), errors.Is(want, s))
				}
			}
			if !strings.Contains(err.Error(), strings.SplitN(want.Error(), ": ", 2)[len(strings.SplitN(want.Error(), ": ", 2))-1]) {
				t.Errorf("message %q lost the issuer's reason %q", err, want)
			}
		})
	}
	_, err := mint(c, "quote")
	if !errors.Is(err, provider.ErrMisconfigured) || strings.Contains(err.Error(), verifier) || strings.Contains(err.Error(), "c3RvcmVka2V5") {
		t.Errorf("err = %v: want Misconfigured without the verifier", err)
	}
}

func TestReviewsAreCached(t *testing.T) {
	e := start(t, "issuer-cache")
	c := e.client(t, driverToken(t, "node-c", remote.Audience))
	before := reviews.Load()
	for i := range 20 {
		if _, err := mint(c, fmt.Sprintf("lease-%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	if n := reviews.Load() - before; n != 1 {
		t.Errorf("%d TokenReviews for 20 calls with one token, want 1", n)
	}
	// A refused token too: a misconfigured node plugin retries often.
	bad := e.client(t, driverToken(t, "node-c", "vault"))
	before = reviews.Load()
	for i := range 20 {
		if _, err := mint(bad, fmt.Sprintf("lease-%d", i)); !errors.Is(err, provider.ErrMisconfigured) {
			t.Fatalf("err = %v, want Misconfigured", err)
		}
	}
	if n := reviews.Load() - before; n != 1 {
		t.Errorf("%d TokenReviews for 20 calls with one refused token, want 1", n)
	}
}

func TestIssuerDownIsUnavailable(t *testing.T) {
	e := start(t, "issuer-down")
	c := e.client(t, driverToken(t, "node-a", remote.Audience))
	if _, err := mint(c, "lease-1"); err != nil {
		t.Fatal(err)
	}
	e.stop()
	for _, call := range map[string]func() error{
		"mint": func() error { _, err := mint(c, "lease-2"); return err },
		"extend": func() error {
			_, err := c.Extend(context.Background(), postgres.ExtendRequest{LeaseID: "lease-1"})
			return err
		},
		"drop": func() error { return c.Drop(context.Background(), postgres.DropRequest{LeaseID: "lease-1"}) },
	} {
		if err := call(); !errors.Is(err, provider.ErrUnavailable) {
			t.Errorf("err = %v, want Unavailable", err)
		}
	}
	// Nothing listening at all (a fresh client: no connection to reuse).
	ports, err := freeport.Ports(1)
	if err != nil {
		t.Fatal(err)
	}
	e.url = fmt.Sprintf("https://localhost:%d", ports[0])
	if _, err := mint(e.client(t, "x"), "lease-3"); !errors.Is(err, provider.ErrUnavailable) {
		t.Errorf("err = %v, want Unavailable", err)
	}
}

func TestUntrustedIssuerIsRefused(t *testing.T) {
	e := start(t, "issuer-trust")
	other := start(t, "issuer-trust-2") // another signer
	c := e.clientTrusting(t, driverToken(t, "node-a", remote.Audience), other.ns)
	if _, err := mint(c, "lease-1"); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Errorf("err = %v, want a certificate error", err)
	}
	if len(e.auth.callers) != 0 {
		t.Error("the request reached an issuer the client does not trust")
	}
}

func init() { harness.RememberSecret(verifier) }

// A node plugin reaches the issuer at its Service's cluster IP, read
// through the API (a node may have no cluster DNS), and still verifies
// the Service's name.
func TestServiceNameWithoutClusterDNS(t *testing.T) {
	e := start(t, "issuer-dial")
	ctx := context.Background()
	svc, err := admin.CoreV1().Services(e.ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "issuer"},
		Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Port: int32(e.port)}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// kube-proxy's part: the cluster IP leads to the issuer's listener.
	var dialed []string
	var mu sync.Mutex
	proxy := func(ctx context.Context, network, addr string) (net.Conn, error) {
		host, port, _ := net.SplitHostPort(addr)
		mu.Lock()
		dialed = append(dialed, host)
		mu.Unlock()
		if host == svc.Spec.ClusterIP {
			addr = net.JoinHostPort("127.0.0.1", port)
		}
		return (&net.Dialer{Timeout: 5 * time.Second}).DialContext(ctx, network, addr)
	}
	path, err := issuertest.WriteToken(t.TempDir(), "token", driverToken(t, "node-a", remote.Audience))
	if err != nil {
		t.Fatal(err)
	}
	c, err := remote.NewClient(remote.ClientOptions{URL: fmt.Sprintf("https://issuer.%s.svc:%d", e.ns, e.port), TokenFile: path,
		Roots: remote.RootsConfigMap(admin, e.ns, "issuer-ca"), Dial: remote.ServiceDial(admin, proxy)})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := mint(c, "lease-1"); err != nil {
		t.Fatalf("through the cluster IP: %v", err)
	}
	if len(dialed) != 1 || dialed[0] != svc.Spec.ClusterIP {
		t.Errorf("dialed %v, want the cluster IP %s only (no DNS lookup)", dialed, svc.Spec.ClusterIP)
	}
	// A Service it cannot read: the name as given.
	dialed = nil
	c2, err := remote.NewClient(remote.ClientOptions{URL: fmt.Sprintf("https://localhost:%d", e.port), TokenFile: path,
		Roots: remote.RootsConfigMap(admin, e.ns, "issuer-ca"), Dial: remote.ServiceDial(admin, proxy)})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := mint(c2, "lease-2"); err != nil || len(dialed) != 1 || dialed[0] != "localhost" {
		t.Errorf("a name that is no Service: dialed %v, %v", dialed, err)
	}
}
