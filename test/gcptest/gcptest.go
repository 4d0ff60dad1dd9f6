// Package gcptest is a stand-in for the Google Cloud services the gcp
// provider calls, which cannot run here: one HTTPS server on 127.0.0.1
// that speaks the documented REST protocol of the Security Token Service
// (token exchange, POST /v1/token, RFC 8693), IAM Credentials
// (generateAccessToken) and Secret Manager (versions.access), with their
// status codes and error bodies, and a tokeninfo endpoint a pod calls with
// its access token.
//
// It validates the subject token it is handed as Google validates an OIDC
// token of a workload identity provider: the signature against the
// issuer's JWKS (found through its discovery document; here the real
// kube-apiserver of the test), the issuer, the audience and the expiry.
// Every call is counted; faults (an error status, a hang, a corrupt
// checksum) are injected per service.
package gcptest

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	josejwt "github.com/go-jose/go-jose/v4/jwt"
)

// The services, as Calls and Fail name them.
const (
	STS       = "sts"
	IAM       = "iamcredentials"
	Access    = "secretmanager"
	TokenInfo = "tokeninfo"
)

// Options shape a stand-in.
type Options struct {
	// Issuer is the OIDC issuer whose tokens the workload identity
	// provider trusts (a kube-apiserver's service-account issuer).
	Issuer string
	// OIDCClient fetches the issuer's discovery document and JWKS (a
	// kube-apiserver asks for credentials).
	OIDCClient *http.Client
	// Audience is the workload identity provider's name:
	// //iam.googleapis.com/projects/N/locations/global/workloadIdentityPools/P/providers/X.
	Audience string
	// TokenAudience is the audience subject tokens must carry; default
	// "https:" + Audience, Google's default allowed audience.
	TokenAudience string
	// FederatedLifetime is the lifetime of federated tokens (default 1
	// hour, never past the subject token's expiry).
	FederatedLifetime time.Duration
	// CertIPs are more addresses its certificate is valid for (a node's,
	// where a forwarder there leads to it); it listens on 127.0.0.1 only.
	CertIPs []net.IP
}

// Server is the stand-in.
type Server struct {
	// URL is the base URL of every service.
	URL string
	// CAFile is a PEM file of the CA that vouches for URL.
	CAFile string
	// CAPEM is its content.
	CAPEM []byte

	opts Options
	srv  *httptest.Server
	stop chan struct{}

	mu       sync.Mutex
	jwks     *jose.JSONWebKeySet
	tokens   map[string]grant // access tokens issued
	issued   []string
	calls    map[string]int
	faults   map[string]fault
	corrupt  bool
	secrets  map[string]*secret         // "projects/P[/locations/L]/secrets/S"
	imperson map[string]map[string]bool // service account → principals that may impersonate it
	numbers  map[string]string          // project ID → number
}

type grant struct {
	principal string // principal://... or serviceAccount:EMAIL
	email     string
	scopes    []string
	expires   time.Time
}

type fault struct {
	n      int
	status int
	hang   time.Duration
	lose   bool // do the call, then drop the connection unanswered
}

type secret struct {
	versions [][]byte // version n is versions[n-1]
	aliases  map[string]int
	access   map[string]bool // principals with secretAccessor
}

// Start starts a stand-in on 127.0.0.1 over TLS, stopped when the test ends.
func Start(t testing.TB, opts Options) *Server {
	t.Helper()
	if opts.TokenAudience == "" {
		opts.TokenAudience = "https:" + opts.Audience
	}
	if opts.FederatedLifetime == 0 {
		opts.FederatedLifetime = time.Hour
	}
	s := &Server{opts: opts, tokens: map[string]grant{}, calls: map[string]int{}, faults: map[string]fault{},
		secrets: map[string]*secret{}, imperson: map[string]map[string]bool{}, numbers: map[string]string{},
		stop: make(chan struct{})}
	s.srv = httptest.NewUnstartedServer(http.HandlerFunc(s.serve))
	if len(opts.CertIPs) > 0 {
		s.srv.TLS = &tls.Config{Certificates: []tls.Certificate{selfSigned(t, append([]net.IP{net.IPv4(127, 0, 0, 1)}, opts.CertIPs...))}}
	}
	s.srv.StartTLS()
	t.Cleanup(s.srv.Close)
	t.Cleanup(func() { close(s.stop) }) // runs first: hung calls end
	s.URL = s.srv.URL
	s.CAPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: s.srv.Certificate().Raw})
	s.CAFile = filepath.Join(t.TempDir(), "gcp-standin-ca.pem")
	if err := os.WriteFile(s.CAFile, s.CAPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	return s
}

// Client is an HTTP client that trusts the stand-in.
func (s *Server) Client() *http.Client { return s.srv.Client() }

// Principal is the federated principal of a Kubernetes service account,
// as IAM policies name it.
func (s *Server) Principal(ns, sa string) string {
	pool, _, _ := strings.Cut(strings.TrimPrefix(s.opts.Audience, "//"), "/providers/")
	return "principal://" + pool + "/subject/system:serviceaccount:" + ns + ":" + sa
}

// ServiceAccountPrincipal is how IAM policies name a service account.
func ServiceAccountPrincipal(email string) string { return "serviceAccount:" + email }

// AllowImpersonation lets principal mint tokens of the service account
// email (roles/iam.workloadIdentityUser), which then exists.
func (s *Server) AllowImpersonation(email, principal string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.imperson[email] == nil {
		s.imperson[email] = map[string]bool{}
	}
	s.imperson[email][principal] = true
}

// AddVersion adds a version to the secret name
// ("projects/P/secrets/S" or "projects/P/locations/L/secrets/S") and
// returns its number.
func (s *Server) AddVersion(name string, value []byte) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	sec := s.secret(name)
	sec.versions = append(sec.versions, slices.Clone(value))
	return len(sec.versions)
}

// SetAlias points alias of secret name at version.
func (s *Server) SetAlias(name, alias string, version int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.secret(name).aliases[alias] = version
}

// GrantAccess gives principal roles/secretmanager.secretAccessor on secret name.
func (s *Server) GrantAccess(name, principal string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.secret(name).access[principal] = true
}

func (s *Server) secret(name string) *secret {
	sec := s.secrets[name]
	if sec == nil {
		sec = &secret{aliases: map[string]int{}, access: map[string]bool{}}
		s.secrets[name] = sec
	}
	return sec
}

// Fail makes the next n calls of service answer status with Google's
// error body for it, after hang (each call waits that long, or until its
// client gives up).
func (s *Server) Fail(service string, n, status int, hang time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults[service] = fault{n: n, status: status, hang: hang}
}

// Lose makes the next n calls of service done but unanswered: the call
// does what it does (a token is minted), then the connection is dropped.
func (s *Server) Lose(service string, n int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults[service] = fault{n: n, lose: true}
}

// CorruptChecksums makes versions.access answer a dataCrc32c that does
// not match the data.
func (s *Server) CorruptChecksums(on bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.corrupt = on
}

// Calls is how many calls service had (all services: "").
func (s *Server) Calls(service string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if service != "" {
		return s.calls[service]
	}
	n := 0
	for _, c := range s.calls {
		n += c
	}
	return n
}

// Issued are the access tokens issued so far: the test looks for them in
// logs and errors.
func (s *Server) Issued() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.issued)
}

// googleError answers Google's JSON error of its APIs (google.rpc.Status).
func googleError(w http.ResponseWriter, code int, status, msg string) {
	w.Header().Set("Content-Type", "application/json; charset=UTF-8")
	w.WriteHeader(code)
	writeIndented(w, map[string]any{"error": map[string]any{"code": code, "message": msg, "status": status}})
}

// oauthError answers STS's error (RFC 6749 section 5.2).
func oauthError(w http.ResponseWriter, code int, errCode, desc string) {
	w.Header().Set("Content-Type", "application/json; charset=UTF-8")
	w.WriteHeader(code)
	writeIndented(w, map[string]string{"error": errCode, "error_description": desc})
}

// writeIndented writes JSON on several lines, as Google's services answer.
func writeIndented(w io.Writer, v any) {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

var statusNames = map[int]string{
	http.StatusBadRequest: "INVALID_ARGUMENT", http.StatusUnauthorized: "UNAUTHENTICATED", http.StatusForbidden: "PERMISSION_DENIED",
	http.StatusNotFound: "NOT_FOUND", http.StatusTooManyRequests: "RESOURCE_EXHAUSTED", http.StatusInternalServerError: "INTERNAL",
	http.StatusServiceUnavailable: "UNAVAILABLE", http.StatusGatewayTimeout: "DEADLINE_EXCEEDED",
}

var (
	generateRE = regexp.MustCompile(`^/v1/projects/-/serviceAccounts/([^/:]+):generateAccessToken$`)
	accessRE   = regexp.MustCompile(`^/v1/(projects/([^/]+)/(?:locations/[^/]+/)?secrets/[^/]+)/versions/([^/:]+):access$`)
)

func (s *Server) serve(w http.ResponseWriter, r *http.Request) {
	var service string
	switch {
	case r.URL.Path == "/v1/token":
		service = STS
	case generateRE.MatchString(r.URL.Path):
		service = IAM
	case accessRE.MatchString(r.URL.Path):
		service = Access
	case r.URL.Path == "/tokeninfo":
		service = TokenInfo
	default:
		googleError(w, http.StatusNotFound, "NOT_FOUND", "The requested URL was not found on this server.")
		return
	}
	s.mu.Lock()
	s.calls[service]++
	f := s.faults[service]
	faulty := f.n > 0
	if faulty {
		f.n--
		s.faults[service] = f
	}
	s.mu.Unlock()
	if faulty && f.lose {
		s.handle(service, httptest.NewRecorder(), r)
		panic(http.ErrAbortHandler) // net/http drops the connection, answering nothing
	}
	if faulty {
		if f.hang > 0 {
			select {
			case <-time.After(f.hang):
			case <-r.Context().Done():
				return
			case <-s.stop:
				return
			}
		}
		if service == STS {
			oauthError(w, f.status, "temporarily_unavailable", "injected fault")
		} else {
			googleError(w, f.status, statusNames[f.status], "injected fault")
		}
		return
	}
	s.handle(service, w, r)
}

func (s *Server) handle(service string, w http.ResponseWriter, r *http.Request) {
	switch service {
	case STS:
		s.exchange(w, r)
	case IAM:
		s.generate(w, r)
	case Access:
		s.access(w, r)
	case TokenInfo:
		s.tokenInfo(w, r)
	}
}

func newToken(prefix string) string {
	b := make([]byte, 24)
	_, _ = rand.Read(b)
	return prefix + base64.RawURLEncoding.EncodeToString(b)
}

// exchange is STS's token exchange.
func (s *Server) exchange(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost || !strings.HasPrefix(r.Header.Get("Content-Type"), "application/x-www-form-urlencoded") {
		oauthError(w, http.StatusBadRequest, "invalid_request", "Request must be a POST of application/x-www-form-urlencoded.")
		return
	}
	if err := r.ParseForm(); err != nil {
		oauthError(w, http.StatusBadRequest, "invalid_request", "The request body is not a form.")
		return
	}
	f := r.PostForm
	switch {
	case f.Get("grant_type") != "urn:ietf:params:oauth:grant-type:token-exchange":
		oauthError(w, http.StatusBadRequest, "unsupported_grant_type", "Unsupported grant type.")
	case f.Get("requested_token_type") != "urn:ietf:params:oauth:token-type:access_token":
		oauthError(w, http.StatusBadRequest, "invalid_request", "Invalid requested_token_type.")
	case f.Get("subject_token_type") != "urn:ietf:params:oauth:token-type:jwt" && f.Get("subject_token_type") != "urn:ietf:params:oauth:token-type:id_token":
		oauthError(w, http.StatusBadRequest, "invalid_request", "Invalid subject_token_type.")
	case f.Get("audience") != s.opts.Audience:
		oauthError(w, http.StatusBadRequest, "invalid_target", "The target service indicated by the \"audience\" parameters is invalid.")
	case strings.TrimSpace(f.Get("scope")) == "":
		oauthError(w, http.StatusBadRequest, "invalid_scope", "The scope parameter is required.")
	default:
		sub, exp, err := s.verify(r.Context(), f.Get("subject_token"))
		if err != nil {
			oauthError(w, http.StatusBadRequest, "invalid_grant", err.Error())
			return
		}
		expires := time.Now().Add(s.opts.FederatedLifetime)
		if exp.Before(expires) {
			expires = exp
		}
		tok := newToken("ya29.fed-")
		s.mu.Lock()
		s.tokens[tok] = grant{principal: s.Principal(sub.ns, sub.sa), scopes: strings.Fields(f.Get("scope")), expires: expires}
		s.issued = append(s.issued, tok)
		s.mu.Unlock()
		w.Header().Set("Content-Type", "application/json; charset=UTF-8")
		_ = json.NewEncoder(w).Encode(map[string]any{
			"access_token": tok, "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
			"token_type": "Bearer", "expires_in": int(time.Until(expires).Seconds()),
		})
	}
}

type subject struct{ ns, sa string }

// verify checks a subject token as a workload identity provider of OIDC
// does: signed by a key of the issuer's JWKS, the issuer's, for the
// allowed audience, not expired. It never quotes the token.
func (s *Server) verify(ctx context.Context, raw string) (subject, time.Time, error) {
	tok, err := josejwt.ParseSigned(raw, []jose.SignatureAlgorithm{jose.RS256, jose.ES256})
	if err != nil {
		return subject{}, time.Time{}, errors.New("unable to parse the ID token")
	}
	keys, err := s.keys(ctx, false)
	if err != nil {
		return subject{}, time.Time{}, err
	}
	var c josejwt.Claims
	if err := tok.Claims(keys, &c); err != nil {
		if keys, err = s.keys(ctx, true); err != nil { // rotated keys: fetch again once
			return subject{}, time.Time{}, err
		}
		if err := tok.Claims(keys, &c); err != nil {
			return subject{}, time.Time{}, errors.New("invalid JWT signature")
		}
	}
	if err := c.ValidateWithLeeway(josejwt.Expected{Issuer: s.opts.Issuer, AnyAudience: josejwt.Audience{s.opts.TokenAudience}, Time: time.Now()}, 0); err != nil {
		return subject{}, time.Time{}, fmt.Errorf("the ID token was rejected: %v", err)
	}
	if c.Expiry == nil {
		return subject{}, time.Time{}, errors.New("the ID token has no expiry")
	}
	parts := strings.Split(c.Subject, ":")
	if len(parts) != 4 || parts[0] != "system" || parts[1] != "serviceaccount" {
		return subject{}, time.Time{}, errors.New("the ID token's subject is not a service account")
	}
	return subject{ns: parts[2], sa: parts[3]}, c.Expiry.Time(), nil
}

// keys are the issuer's JWKS, through its discovery document.
func (s *Server) keys(ctx context.Context, refresh bool) (*jose.JSONWebKeySet, error) {
	s.mu.Lock()
	k := s.jwks
	s.mu.Unlock()
	if k != nil && !refresh {
		return k, nil
	}
	var disc struct {
		Issuer  string `json:"issuer"`
		JWKSURI string `json:"jwks_uri"`
	}
	if err := s.getJSON(ctx, strings.TrimRight(s.opts.Issuer, "/")+"/.well-known/openid-configuration", &disc); err != nil {
		return nil, fmt.Errorf("unable to fetch the issuer's discovery document: %v", err)
	}
	if disc.Issuer != s.opts.Issuer {
		return nil, errors.New("the discovery document names another issuer")
	}
	var set jose.JSONWebKeySet
	if err := s.getJSON(ctx, disc.JWKSURI, &set); err != nil {
		return nil, fmt.Errorf("unable to fetch the issuer's JWKS: %v", err)
	}
	s.mu.Lock()
	s.jwks = &set
	s.mu.Unlock()
	return &set, nil
}

func (s *Server) getJSON(ctx context.Context, url string, v any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := s.opts.OIDCClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("HTTP %d", resp.StatusCode)
	}
	return json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(v)
}

// bearer is the grant of the request's bearer token, or an error answered.
// A call of the wrong method is refused after the token is.
func (s *Server) bearer(w http.ResponseWriter, r *http.Request, method string) (grant, bool) {
	tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	s.mu.Lock()
	g, known := s.tokens[tok]
	s.mu.Unlock()
	if !ok || !known || time.Now().After(g.expires) {
		w.Header().Set("WWW-Authenticate", `Bearer realm="https://accounts.google.com/", error="invalid_token"`)
		googleError(w, http.StatusUnauthorized, "UNAUTHENTICATED",
			"Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential.")
		return grant{}, false
	}
	if r.Method != method {
		googleError(w, http.StatusMethodNotAllowed, "INVALID_ARGUMENT", "Method not allowed.")
		return grant{}, false
	}
	return g, true
}

// generate is IAM Credentials' generateAccessToken.
func (s *Server) generate(w http.ResponseWriter, r *http.Request) {
	g, ok := s.bearer(w, r, http.MethodPost)
	if !ok {
		return
	}
	email := generateRE.FindStringSubmatch(r.URL.Path)[1]
	var in struct {
		Delegates []string `json:"delegates"`
		Scope     []string `json:"scope"`
		Lifetime  string   `json:"lifetime"`
	}
	if err := json.NewDecoder(io.LimitReader(r.Body, 1<<16)).Decode(&in); err != nil {
		googleError(w, http.StatusBadRequest, "INVALID_ARGUMENT", "Invalid JSON payload received.")
		return
	}
	lifetime := time.Hour
	if in.Lifetime != "" {
		sec, err := strconv.ParseFloat(strings.TrimSuffix(in.Lifetime, "s"), 64)
		if err != nil || !strings.HasSuffix(in.Lifetime, "s") || sec <= 0 || sec > 3600 {
			googleError(w, http.StatusBadRequest, "INVALID_ARGUMENT", "The lifetime must be a duration of at most 3600s.")
			return
		}
		lifetime = time.Duration(sec * float64(time.Second))
	}
	if len(in.Scope) == 0 {
		googleError(w, http.StatusBadRequest, "INVALID_ARGUMENT", "Scope required.")
		return
	}
	s.mu.Lock()
	allowed, exists := s.imperson[email]
	s.mu.Unlock()
	switch {
	case !exists:
		googleError(w, http.StatusNotFound, "NOT_FOUND", "Not found; Gaia id not found for email "+email)
		return
	case !allowed[g.principal] || len(in.Delegates) > 0:
		googleError(w, http.StatusForbidden, "PERMISSION_DENIED",
			"Permission 'iam.serviceAccounts.getAccessToken' denied on resource (or it may not exist).")
		return
	}
	tok := newToken("ya29.sa-")
	expires := time.Now().Add(lifetime).UTC().Truncate(time.Second)
	s.mu.Lock()
	s.tokens[tok] = grant{principal: ServiceAccountPrincipal(email), email: email, scopes: in.Scope, expires: expires}
	s.issued = append(s.issued, tok)
	s.mu.Unlock()
	w.Header().Set("Content-Type", "application/json; charset=UTF-8")
	_ = json.NewEncoder(w).Encode(map[string]string{"accessToken": tok, "expireTime": expires.Format(time.RFC3339)})
}

// access is Secret Manager's versions.access.
func (s *Server) access(w http.ResponseWriter, r *http.Request) {
	g, ok := s.bearer(w, r, http.MethodGet)
	if !ok {
		return
	}
	m := accessRE.FindStringSubmatch(r.URL.Path)
	name, project, version := m[1], m[2], m[3]
	s.mu.Lock()
	sec := s.secrets[name]
	corrupt := s.corrupt
	var data []byte
	n := 0
	status, msg := 0, ""
	switch {
	case !slices.Contains(g.scopes, "https://www.googleapis.com/auth/cloud-platform"):
		status, msg = http.StatusForbidden, "Request had insufficient authentication scopes."
	case sec == nil || !sec.access[g.principal]:
		// Google does not tell a secret that exists from one the caller may not see.
		status, msg = http.StatusForbidden, fmt.Sprintf("Permission 'secretmanager.versions.access' denied for resource '%s/versions/%s' (or it may not exist).", name, version)
	default:
		if version == "latest" {
			n = len(sec.versions)
		} else if a, ok := sec.aliases[version]; ok {
			n = a
		} else {
			n, _ = strconv.Atoi(version)
		}
		if n < 1 || n > len(sec.versions) {
			status, msg = http.StatusNotFound, fmt.Sprintf("Secret Version [%s/versions/%s] not found.", name, version)
		} else {
			data = sec.versions[n-1]
		}
	}
	number := s.number(project)
	s.mu.Unlock()
	if status != 0 {
		googleError(w, status, statusNames[status], msg)
		return
	}
	sum := int64(crc32.Checksum(data, crc32.MakeTable(crc32.Castagnoli)))
	if corrupt {
		sum ^= 1
	}
	full := strings.Replace(name, "projects/"+project+"/", "projects/"+number+"/", 1) + "/versions/" + strconv.Itoa(n)
	w.Header().Set("Content-Type", "application/json; charset=UTF-8")
	_ = json.NewEncoder(w).Encode(map[string]any{
		"name":    full,
		"payload": map[string]any{"data": base64.StdEncoding.EncodeToString(data), "dataCrc32c": strconv.FormatInt(sum, 10)},
	})
}

// number is a project's number (projects are addressed by ID or number;
// answers name the number). Called with s.mu held.
func (s *Server) number(project string) string {
	if _, err := strconv.ParseUint(project, 10, 64); err == nil {
		return project
	}
	n, ok := s.numbers[project]
	if !ok {
		b := make([]byte, 4)
		_, _ = rand.Read(b)
		n = strconv.FormatUint(100000000000+uint64(b[0])<<24|uint64(b[1])<<16|uint64(b[2])<<8|uint64(b[3]), 10)
		s.numbers[project] = n
	}
	return n
}

// tokenInfo tells the holder of an access token who it is: the
// authenticated endpoint a pod calls with its token.
func (s *Server) tokenInfo(w http.ResponseWriter, r *http.Request) {
	g, ok := s.bearer(w, r, http.MethodGet)
	if !ok {
		return
	}
	out := map[string]any{"scope": strings.Join(g.scopes, " "), "exp": strconv.FormatInt(g.expires.Unix(), 10),
		"expires_in": strconv.Itoa(int(time.Until(g.expires).Seconds())), "sub": g.principal}
	if g.email != "" {
		out["email"] = g.email
	}
	w.Header().Set("Content-Type", "application/json; charset=UTF-8")
	_ = json.NewEncoder(w).Encode(out)
}

// selfSigned is a certificate for ips that vouches for itself.
func selfSigned(t testing.TB, ips []net.IP) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: "gcp-standin"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour), IPAddresses: ips,
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}
