package gcptest

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"hash/crc32"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/oauth2"
	"golang.org/x/oauth2/google/externalaccount"

	"github.com/ephemeral-secrets/csi-driver/test/kube"
	"github.com/ephemeral-secrets/csi-driver/test/standin"
)

const audience = "//iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/esc/providers/kube"

var cluster *kube.Cluster

func TestMain(m *testing.M) { Main(m, &cluster) }

func start(t *testing.T) *Server {
	return Start(t, Options{Issuer: cluster.Issuer, OIDCClient: OIDCClient(cluster.CAPEM, kube.AdminToken), Audience: audience})
}

type supplier string

func (s supplier) SubjectToken(context.Context, externalaccount.SupplierOptions) (string, error) {
	return string(s), nil
}

// googleToken runs golang.org/x/oauth2's external-account flow (Google's
// own client) against the stand-in: STS, and generateAccessToken for gsa.
func googleToken(t *testing.T, s *Server, subject, gsa string) (*oauth2.Token, error) {
	t.Helper()
	conf := externalaccount.Config{
		Audience: audience, SubjectTokenType: "urn:ietf:params:oauth:token-type:jwt",
		TokenURL: s.URL + "/v1/token", Scopes: []string{"https://www.googleapis.com/auth/cloud-platform"},
		SubjectTokenSupplier: supplier(subject),
	}
	if gsa != "" {
		conf.ServiceAccountImpersonationURL = s.URL + "/v1/projects/-/serviceAccounts/" + gsa + ":generateAccessToken"
		conf.ServiceAccountImpersonationLifetimeSeconds = 600
	}
	ctx := context.WithValue(context.Background(), oauth2.HTTPClient, s.Client())
	ts, err := externalaccount.NewTokenSource(ctx, conf)
	if err != nil {
		t.Fatal(err)
	}
	return ts.Token()
}

func get(t *testing.T, s *Server, path, token string, out any) int {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, s.URL+path, nil)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := s.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode
}

// federated is the token of team-a/app's pod p1 and the federated token
// Google's client gets for it.
func federated(t *testing.T, s *Server) (string, *oauth2.Token) {
	t.Helper()
	jwt, _, err := PodToken(context.Background(), cluster.Config(), "team-a", "app", "p1", "https:"+audience)
	if err != nil {
		t.Fatal(err)
	}
	fed, err := googleToken(t, s, jwt, "")
	if err != nil {
		t.Fatalf("federated token: %v", err)
	}
	return jwt, fed
}

// Google's client library gets a federated token for a real
// kube-apiserver's service-account token, impersonates a service account
// with it, and the tokens work at the stand-in's authenticated endpoints.
func TestGoogleClientLibrary(t *testing.T) {
	s := start(t)
	jwt, fed := federated(t, s)
	if left := time.Until(fed.Expiry); left < 50*time.Minute || left > time.Hour {
		t.Errorf("federated token lives %s, want about the subject token's hour", left)
	}
	var info map[string]string
	if code := get(t, s, "/tokeninfo", fed.AccessToken, &info); code != 200 || info["sub"] != s.Principal("team-a", "app") {
		t.Errorf("tokeninfo of the federated token: %d %v", code, info)
	}

	gsa := "app-reader@proj-a.iam.gserviceaccount.com"
	if _, err := googleToken(t, s, jwt, gsa); err == nil || !strings.Contains(err.Error(), "status code 404") {
		t.Errorf("impersonating a service account that does not exist: %v", err)
	}
	s.AllowImpersonation(gsa, s.Principal("team-a", "other"))
	if _, err := googleToken(t, s, jwt, gsa); err == nil || !strings.Contains(err.Error(), "status code 403") || !strings.Contains(err.Error(), "PERMISSION_DENIED") {
		t.Errorf("impersonating without the binding: %v", err)
	}
	s.AllowImpersonation(gsa, s.Principal("team-a", "app"))
	sa, err := googleToken(t, s, jwt, gsa)
	if err != nil {
		t.Fatalf("impersonated token: %v", err)
	}
	if left := time.Until(sa.Expiry); left < 9*time.Minute || left > 10*time.Minute+time.Second {
		t.Errorf("impersonated token lives %s, want the 600s asked", left)
	}
	if code := get(t, s, "/tokeninfo", sa.AccessToken, &info); code != 200 || info["email"] != gsa {
		t.Errorf("tokeninfo of the impersonated token: %d %v", code, info)
	}
	if got := s.Calls(STS); got != 4 {
		t.Errorf("STS calls = %d, want 4 (one per token source)", got)
	}
	if got := s.Calls(IAM); got != 3 {
		t.Errorf("generateAccessToken calls = %d, want 3", got)
	}

	// versions.access with the impersonated token, through oauth2's client.
	name := "projects/proj-a/secrets/db"
	s.AddVersion(name, []byte("v1-value"))
	var denied map[string]map[string]any
	if code := get(t, s, "/v1/"+name+"/versions/latest:access", sa.AccessToken, &denied); code != 403 || denied["error"]["status"] != "PERMISSION_DENIED" {
		t.Errorf("access without secretAccessor: %d %v", code, denied)
	}
	s.GrantAccess(name, ServiceAccountPrincipal(gsa))
	var out struct {
		Name    string `json:"name"`
		Payload struct {
			Data       []byte `json:"data"`
			DataCrc32c string `json:"dataCrc32c"`
		} `json:"payload"`
	}
	if code := get(t, s, "/v1/"+name+"/versions/latest:access", sa.AccessToken, &out); code != 200 || string(out.Payload.Data) != "v1-value" {
		t.Fatalf("access: %d %+v", code, out)
	}
	if sum, _ := strconv.ParseInt(out.Payload.DataCrc32c, 10, 64); uint32(sum) != crc32.Checksum(out.Payload.Data, crc32.MakeTable(crc32.Castagnoli)) {
		t.Errorf("dataCrc32c %s does not match the data", out.Payload.DataCrc32c)
	}
	if !strings.HasPrefix(out.Name, "projects/") || !strings.HasSuffix(out.Name, "/secrets/db/versions/1") || strings.Contains(out.Name, "proj-a") {
		t.Errorf("version name %q, want the project's number and the version's", out.Name)
	}
	var unauth map[string]map[string]any
	if code := get(t, s, "/v1/"+name+"/versions/1:access", "ya29.made-up", &unauth); code != 401 || unauth["error"]["status"] != "UNAUTHENTICATED" {
		t.Errorf("an unknown token: %d %v", code, unauth)
	}
}

// The stand-in refuses subject tokens Google would refuse: another
// audience, another signer, none at all.
func TestSubjectTokenValidation(t *testing.T) {
	s := start(t)
	ctx := context.Background()
	other, _, err := PodToken(ctx, cluster.Config(), "team-a", "app", "p1", "https://elsewhere.example")
	if err != nil {
		t.Fatal(err)
	}
	for name, jwt := range map[string]string{
		"another audience":  other,
		"unsigned":          standin.Token("team-a", "app", "", "https:"+audience),
		"not a token":       "opaque",
		"signature changed": other[:len(other)-4] + "AAAA",
	} {
		_, err := googleToken(t, s, jwt, "")
		if err == nil || !strings.Contains(err.Error(), "status code 400") || !strings.Contains(err.Error(), "invalid_grant") {
			t.Errorf("%s: %v, want 400 invalid_grant", name, err)
		}
		if strings.Contains(fmt.Sprint(err), jwt) {
			t.Errorf("%s: the error quotes the subject token", name)
		}
	}
	if got, want := s.Calls(STS), 4; got != want {
		t.Errorf("STS calls = %d, want %d", got, want)
	}
	if len(s.Issued()) != 0 {
		t.Errorf("tokens issued for refused subjects: %d", len(s.Issued()))
	}
}

// Injected faults answer the status asked with Google's error body, once
// per count, and a hang lasts until the client gives up.
func TestFaults(t *testing.T) {
	s := start(t)
	jwt, _, err := PodToken(context.Background(), cluster.Config(), "team-a", "app", "p1", "https:"+audience)
	if err != nil {
		t.Fatal(err)
	}
	s.Fail(STS, 1, http.StatusServiceUnavailable, 0)
	if _, err := googleToken(t, s, jwt, ""); err == nil || !strings.Contains(err.Error(), "status code 503") {
		t.Errorf("injected 503: %v", err)
	}
	if _, err := googleToken(t, s, jwt, ""); err != nil {
		t.Errorf("after the fault: %v", err)
	}
	issued := len(s.Issued())
	s.Lose(STS, 1)
	if _, err := googleToken(t, s, jwt, ""); err == nil || len(s.Issued()) != issued+1 {
		t.Errorf("a lost answer: %v, %d tokens minted, want an error and 1", err, len(s.Issued())-issued)
	}
	s.Fail(STS, 1, http.StatusServiceUnavailable, time.Hour)
	ctx, cancel := context.WithTimeout(context.WithValue(context.Background(), oauth2.HTTPClient, s.Client()), 300*time.Millisecond)
	defer cancel()
	ts, _ := externalaccount.NewTokenSource(ctx, externalaccount.Config{Audience: audience, SubjectTokenType: "urn:ietf:params:oauth:token-type:jwt",
		TokenURL: s.URL + "/v1/token", Scopes: []string{"x"}, SubjectTokenSupplier: supplier(jwt)})
	if _, err := ts.Token(); err == nil || ctx.Err() == nil {
		t.Errorf("a hang: %v", err)
	}
}

// A stand-in reached through a forwarder on another address has a
// certificate for it too, and still for 127.0.0.1.
func TestCertificateForMoreAddresses(t *testing.T) {
	nodeIP := net.IPv4(10, 0, 0, 7)
	s := Start(t, Options{Issuer: cluster.Issuer, OIDCClient: OIDCClient(cluster.CAPEM, kube.AdminToken), Audience: audience, CertIPs: []net.IP{nodeIP}})
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(s.CAPEM) {
		t.Fatal("CAPEM holds no certificate")
	}
	cert := s.srv.Certificate()
	for _, ip := range []string{"10.0.0.7", "127.0.0.1"} {
		if _, err := cert.Verify(x509.VerifyOptions{Roots: pool, DNSName: ip}); err != nil {
			t.Errorf("%s: %v", ip, err)
		}
	}
	var info map[string]any
	if code := get(t, s, "/tokeninfo", "ya29.made-up", &info); code != http.StatusUnauthorized {
		t.Errorf("tokeninfo over the new certificate: HTTP %d", code)
	}
}
