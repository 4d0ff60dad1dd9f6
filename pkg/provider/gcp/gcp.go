// Package gcp is the provider for Google Cloud: a short-lived access token
// per pod through Workload Identity Federation, and Secret Manager values
// read with it, with the parameters of GoogleCloudPlatform's
// secrets-store-csi-driver-provider-gcp.
//
// The pod's service-account token (audience: the admin's workload
// identity provider) is exchanged at Google's Security Token Service
// (RFC 8693, the external-account flow of golang.org/x/oauth2) for a
// federated access token; where the admin maps the pod's namespace and
// service account to a Google service account, that one is impersonated
// (IAM Credentials generateAccessToken) with the admin's lifetime and
// scopes. The token is the pod's: it reads the class's secrets and, unless
// the class says otherwise, is written to a file for the pod's own calls.
//
// Google access tokens cannot be revoked before they expire: at unpublish
// their files go, renewal stops, and the audit says the token stays valid
// until its expiry, which the admin keeps short.
//
// It imports pkg/provider (the contract) and pkg/volumepath (the rule for
// the file names a class asks for), nothing else of ours.
package gcp

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/oauth2"
	"golang.org/x/oauth2/google/externalaccount"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// Name is the provider name a SecretProviderClass gives as spec.provider.
const Name = "gcp"

// Google's public endpoints, the defaults.
const (
	DefaultSTSEndpoint            = "https://sts.googleapis.com"
	DefaultIAMCredentialsEndpoint = "https://iamcredentials.googleapis.com"
	DefaultSecretManagerEndpoint  = "https://secretmanager.googleapis.com"
	// DefaultScope is the scope of the pod's token when the admin names none.
	DefaultScope = "https://www.googleapis.com/auth/cloud-platform"
	// DefaultTokenLifetime is the lifetime of an impersonated token when
	// the admin names none.
	DefaultTokenLifetime = 10 * time.Minute
)

// Config is the admin's configuration of the gcp provider. Classes can
// name nothing outside it.
type Config struct {
	// Audience is the workload identity provider, as STS is told:
	// //iam.googleapis.com/projects/NUMBER/locations/global/workloadIdentityPools/POOL/providers/PROVIDER.
	// Required.
	Audience string `json:"audience"`
	// TokenAudience is the audience of the pod's service-account token
	// (the CSIDriver's tokenRequests must ask for it). Default: "https:"
	// followed by Audience, the audience Google's providers allow unless
	// told otherwise.
	TokenAudience string `json:"tokenAudience,omitempty"`
	// STSEndpoint is the Security Token Service's base URL; default
	// Google's public one; a private endpoint (VPC Service Controls) goes
	// here.
	STSEndpoint string `json:"stsEndpoint,omitempty"`
	// IAMCredentialsEndpoint is IAM Credentials' base URL (impersonation);
	// default Google's public one.
	IAMCredentialsEndpoint string `json:"iamCredentialsEndpoint,omitempty"`
	// SecretManagerEndpoint is Secret Manager's base URL; default Google's
	// public one (and its regional twins for regional secrets).
	SecretManagerEndpoint string `json:"secretManagerEndpoint,omitempty"`
	// Endpoints are more endpoints classes may name in stsEndpoint,
	// iamCredentialsEndpoint and secretManagerEndpoint. Pods' tokens go to
	// no other place.
	Endpoints []string `json:"endpoints,omitempty"`
	// Projects are the projects (IDs or numbers, as resource names write
	// them) whose secrets classes may read; "*" is any. Empty: none.
	Projects []string `json:"projects,omitempty"`
	// ServiceAccounts maps "namespace/serviceaccount" (or "namespace/*")
	// to the Google service accounts its pods may impersonate. A pod of no
	// mapping gets its federated token.
	ServiceAccounts map[string][]string `json:"serviceAccounts,omitempty"`
	// Scopes of the pod's token; default cloud-platform.
	Scopes []string `json:"scopes,omitempty"`
	// TokenLifetimeSeconds is the lifetime of impersonated tokens (60 to
	// 43200; default 600). Federated tokens live as long as STS gives.
	TokenLifetimeSeconds int `json:"tokenLifetimeSeconds,omitempty"`
	// TLS is the trust material of endpoints (keyed by endpoint, one of
	// the above); others are verified against the system's roots.
	TLS map[string]provider.TLS `json:"tls,omitempty"`
}

// Provider implements provider.Provider for Google Cloud.
type Provider struct {
	cfg    Config
	client *http.Client
	now    func() time.Time
}

var _ provider.Provider = (*Provider)(nil)

// validServiceAccount is a Google service account's email: an ID of 6 to
// 30 characters at a project's iam.gserviceaccount.com domain.
func validServiceAccount(email string) bool {
	id, domain, ok := strings.Cut(email, "@")
	project, ok2 := strings.CutSuffix(domain, ".iam.gserviceaccount.com")
	return ok && ok2 && validID(id, 6, 30) && only(project, 1, 100, func(c byte) bool { return isLabel(c) || c == '.' })
}

// New checks the admin's configuration and returns a provider. It
// connects to nothing.
func New(cfg Config) (*Provider, error) {
	if cfg.Audience == "" {
		return nil, errors.New("gcp: audience (the workload identity provider) is required")
	}
	if cfg.TokenAudience == "" {
		if !strings.HasPrefix(cfg.Audience, "//iam.googleapis.com/") {
			return nil, errors.New("gcp: tokenAudience is required for an audience that is not a workload identity provider's name")
		}
		cfg.TokenAudience = "https:" + cfg.Audience
	}
	var err error
	for _, e := range []struct {
		v   *string
		def string
	}{{&cfg.STSEndpoint, DefaultSTSEndpoint}, {&cfg.IAMCredentialsEndpoint, DefaultIAMCredentialsEndpoint}, {&cfg.SecretManagerEndpoint, DefaultSecretManagerEndpoint}} {
		if *e.v == "" {
			*e.v = e.def
		}
		if *e.v, err = endpointURL(*e.v); err != nil {
			return nil, err
		}
	}
	for i, e := range cfg.Endpoints {
		if cfg.Endpoints[i], err = endpointURL(e); err != nil {
			return nil, err
		}
	}
	for key, gsas := range cfg.ServiceAccounts {
		ns, sa, ok := strings.Cut(key, "/")
		if !ok || ns == "" || sa == "" {
			return nil, fmt.Errorf("gcp: serviceAccounts: %q is not namespace/serviceaccount or namespace/*", key)
		}
		for _, g := range gsas {
			if !validServiceAccount(g) {
				return nil, fmt.Errorf("gcp: serviceAccounts[%s]: %q is not a service account's email", key, g)
			}
		}
	}
	if len(cfg.Scopes) == 0 {
		cfg.Scopes = []string{DefaultScope}
	}
	switch lt := cfg.TokenLifetimeSeconds; {
	case lt == 0:
		cfg.TokenLifetimeSeconds = int(DefaultTokenLifetime / time.Second)
	case lt < 60 || lt > 43200:
		return nil, errors.New("gcp: tokenLifetimeSeconds must be 60 to 43200")
	}
	rt := &byOrigin{def: http.DefaultTransport, origins: map[string]http.RoundTripper{}}
	for e, t := range cfg.TLS {
		e = strings.TrimRight(e, "/")
		if !slices.Contains(cfg.allowed(), e) {
			return nil, fmt.Errorf("gcp: tls: %q is not one of the endpoints", e)
		}
		tc, err := t.Config("gcp: tls of " + e)
		if err != nil {
			return nil, err
		}
		tr := http.DefaultTransport.(*http.Transport).Clone()
		tr.TLSClientConfig = tc
		u, _ := url.Parse(e)
		rt.origins[u.Scheme+"://"+u.Host] = tr
	}
	client := &http.Client{
		Transport: rt,
		// A redirect would carry the pod's token (STS's form, the bearer
		// header) to an address the admin never listed.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	return &Provider{cfg: cfg, client: client, now: time.Now}, nil
}

// allowed are every endpoint the admin lists.
func (c Config) allowed() []string {
	return append([]string{c.STSEndpoint, c.IAMCredentialsEndpoint, c.SecretManagerEndpoint}, c.Endpoints...)
}

func endpointURL(e string) (string, error) {
	e = strings.TrimRight(e, "/")
	u, err := url.Parse(e)
	if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" || u.RawQuery != "" || u.Fragment != "" || u.User != nil {
		return "", fmt.Errorf("gcp: endpoint %q is not an http(s) URL", e)
	}
	return e, nil
}

// byOrigin sends each request with the admin's TLS of its endpoint.
type byOrigin struct {
	def     http.RoundTripper
	origins map[string]http.RoundTripper
}

func (b *byOrigin) RoundTrip(r *http.Request) (*http.Response, error) {
	if rt, ok := b.origins[r.URL.Scheme+"://"+r.URL.Host]; ok {
		return rt.RoundTrip(r)
	}
	return b.def.RoundTrip(r)
}

// endpoints are the ones a class uses, each the admin's.
type endpoints struct{ sts, iam, sm string }

// check refuses, before any call to Google, everything of a class the
// admin's configuration does not allow: another audience, an endpoint off
// the list, a project or a service account not allowed; then it finds the
// pod's token. It returns the endpoints, the service account to
// impersonate (none: the federated token) and the pod's token.
func (p *Provider) check(c classParams, req provider.Request) (endpoints, string, string, error) {
	var ep endpoints
	if c.audience != "" && c.audience != p.cfg.Audience {
		return ep, "", "", fmt.Errorf("%w: %s: the pod's token goes to the admin's workload identity provider; a class cannot choose another",
			provider.ErrInvalidParameters, AudienceParam)
	}
	for _, e := range []struct {
		dst         *string
		class, def  string
		param, what string
	}{
		{&ep.sts, c.stsEndpoint, p.cfg.STSEndpoint, STSEndpointParam, "STS"},
		{&ep.iam, c.iamEndpoint, p.cfg.IAMCredentialsEndpoint, IAMCredentialsEndpoint, "IAM Credentials"},
		{&ep.sm, c.smEndpoint, p.cfg.SecretManagerEndpoint, SecretManagerEndpoint, "Secret Manager"},
	} {
		v := strings.TrimRight(e.class, "/")
		switch {
		case v == "":
			*e.dst = e.def
		case v == e.def || slices.Contains(p.cfg.Endpoints, v):
			*e.dst = v
		default:
			return ep, "", "", fmt.Errorf("%w: %s %q is not one of the admin's %s endpoints", provider.ErrInvalidParameters, e.param, v, e.what)
		}
	}
	for _, s := range c.secrets {
		if !slices.Contains(p.cfg.Projects, "*") && !slices.Contains(p.cfg.Projects, s.project) {
			return ep, "", "", fmt.Errorf("%w: %s: project %q is not one the admin allows", provider.ErrInvalidParameters, s.ResourceName, s.project)
		}
	}
	mapped := p.mapped(req.Pod)
	gsa := c.serviceAccount
	switch {
	case gsa != "" && !slices.Contains(mapped, gsa):
		return ep, "", "", fmt.Errorf("%w: %s %q is not mapped by the admin to service account %s/%s",
			provider.ErrInvalidParameters, ServiceAccountParam, gsa, req.Pod.Namespace, req.Pod.ServiceAccount)
	case gsa == "" && len(mapped) == 1:
		gsa = mapped[0]
	case gsa == "" && len(mapped) > 1:
		return ep, "", "", fmt.Errorf("%w: service account %s/%s is mapped to several Google service accounts: the class must name one in %s",
			provider.ErrInvalidParameters, req.Pod.Namespace, req.Pod.ServiceAccount, ServiceAccountParam)
	}
	jwt, err := provider.PodToken(req, p.cfg.TokenAudience)
	return ep, gsa, jwt, err
}

// mapped are the Google service accounts the admin maps to the pod's
// namespace and service account.
func (p *Provider) mapped(pod provider.Pod) []string {
	if g, ok := p.cfg.ServiceAccounts[pod.Namespace+"/"+pod.ServiceAccount]; ok {
		return g
	}
	return p.cfg.ServiceAccounts[pod.Namespace+"/*"]
}

// Issue mints the pod's access token and reads the class's secrets with it.
func (p *Provider) Issue(ctx context.Context, req provider.Request) (provider.Lease, error) {
	c, err := parseParams(req.Params)
	if err != nil {
		return provider.Lease{}, err
	}
	ep, gsa, jwt, err := p.check(c, req)
	if err != nil {
		return provider.Lease{}, err
	}
	l := provider.Lease{Values: map[string]string{}, Handle: map[string]string{}, Info: map[string]string{}, IssuedAt: p.now()}
	l.Role = "federated:" + req.Pod.Namespace + "/" + req.Pod.ServiceAccount
	if gsa != "" {
		l.Role = gsa
		l.Info["serviceAccount"] = gsa
	}
	// A pinned version's value never changes: a re-issue keeps the one
	// the lease it replaces read, and reads aliases only.
	versions, read := carryPinned(c.secrets, req.Prior, l.Values)
	l.Modes = c.modes()
	if len(read) == 0 && !c.givesToken() {
		l.Handle["versions"] = versions.String()
		return l, nil // nothing to read and no token to give: no call
	}
	tok, err := p.accessToken(ctx, ep, gsa, jwt)
	if err != nil {
		return provider.Lease{}, err
	}
	for _, s := range read {
		v, name, err := p.access(ctx, ep.sm, s, tok.AccessToken)
		if err != nil {
			return provider.Lease{}, err
		}
		l.Values[s.file()] = v
		versions[s.ResourceName] = name
	}
	if c.givesToken() {
		// The pod holds the token: the lease lives as long as it does.
		l.ExpiresAt = tok.Expiry
		l.Info["expiry"] = tok.Expiry.UTC().Format(time.RFC3339)
		if c.tokenFile != "" {
			l.Values[c.tokenFile] = tok.AccessToken
		}
		if c.tokenJSONFile != "" {
			// The shape of golang.org/x/oauth2's Token, which Go clients
			// read as it is; expires_in for the others.
			doc, _ := json.Marshal(map[string]any{
				"access_token": tok.AccessToken, "token_type": "Bearer",
				"expiry": tok.Expiry.UTC().Format(time.RFC3339), "expires_in": int(tok.Expiry.Sub(l.IssuedAt).Seconds()),
			})
			l.Values[c.tokenJSONFile] = string(doc) + "\n"
		}
	}
	l.Handle["versions"] = versions.String()
	if c.rotationPoll > 0 && c.hasAlias() {
		l.RenewAt = l.IssuedAt.Add(c.rotationPoll)
	}
	return l, nil
}

// subjectToken gives the pod's service-account token to the
// external-account flow.
type subjectToken string

func (s subjectToken) SubjectToken(context.Context, externalaccount.SupplierOptions) (string, error) {
	return string(s), nil
}

// accessToken exchanges the pod's token at STS and, for gsa, impersonates
// it, through golang.org/x/oauth2's external-account flow and the
// provider's HTTP client.
func (p *Provider) accessToken(ctx context.Context, ep endpoints, gsa, jwt string) (*oauth2.Token, error) {
	conf := externalaccount.Config{
		Audience:             p.cfg.Audience,
		SubjectTokenType:     "urn:ietf:params:oauth:token-type:jwt",
		TokenURL:             ep.sts + "/v1/token",
		Scopes:               p.cfg.Scopes,
		SubjectTokenSupplier: subjectToken(jwt),
	}
	what := "STS token exchange"
	if gsa != "" {
		conf.ServiceAccountImpersonationURL = ep.iam + "/v1/projects/-/serviceAccounts/" + url.PathEscape(gsa) + ":generateAccessToken"
		conf.ServiceAccountImpersonationLifetimeSeconds = p.cfg.TokenLifetimeSeconds
		what = "STS token exchange or generateAccessToken for " + gsa
	}
	ctx = context.WithValue(ctx, oauth2.HTTPClient, p.client)
	ts, err := externalaccount.NewTokenSource(ctx, conf)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", provider.ErrMisconfigured, err)
	}
	tok, err := ts.Token()
	if err != nil {
		return nil, classifyOAuth(ctx, err, what)
	}
	if tok.AccessToken == "" || tok.Expiry.IsZero() {
		return nil, fmt.Errorf("%w: %s returned no token or no expiry", provider.ErrUnavailable, what)
	}
	return tok, nil
}

// Renew: a Google access token cannot be extended, and a new one needs
// the pod's current service-account token, which the manager passes to
// Issue: the manager re-issues (a new token; the secrets that name a
// version alias read again, the pinned ones carried over from the lease
// replaced) and swaps the files only where a value changed.
func (p *Provider) Renew(_ context.Context, l provider.Lease) (provider.Lease, error) {
	return l, provider.ErrNotRenewable
}

// Revoke: a lease that gave the pod its access token cannot be revoked
// (Google offers no revocation of federated or impersonated tokens);
// secret values need nothing.
func (p *Provider) Revoke(_ context.Context, l provider.Lease) error {
	c, err := parseParams(l.Params)
	if err != nil {
		return err
	}
	if c.givesToken() {
		return fmt.Errorf("%w: Google access tokens live until their expiry", provider.ErrNotRevocable)
	}
	return nil
}

// statusRE finds the HTTP status and body golang.org/x/oauth2's
// external-account flow puts in its errors.
var statusRE = regexp.MustCompile(`(?s)status code (\d{3}): (.*)`)

// classifyOAuth maps an error of the external-account flow to the
// provider's sentinels, with Google's reason (never the token).
func classifyOAuth(ctx context.Context, err error, what string) error {
	if ctx.Err() != nil {
		return fmt.Errorf("%w: %s: %v", provider.ErrUnavailable, what, ctx.Err())
	}
	m := statusRE.FindStringSubmatch(err.Error())
	if m == nil {
		return fmt.Errorf("%w: %s: %s", provider.ErrUnavailable, what, bounded(err.Error()))
	}
	code, _ := strconv.Atoi(m[1]) // three digits
	return classify(code, []byte(m[2]), what)
}

// googleError is the error body of Google's APIs (IAM Credentials, Secret
// Manager) and of STS (OAuth's error and error_description).
type googleError struct {
	Error json.RawMessage `json:"error"`
	// STS
	Description string `json:"error_description"`
}

type apiError struct {
	Code    int    `json:"code"`
	Message string `json:"message"`
	Status  string `json:"status"`
}

// reason is a short text of Google's error body: status and message, or
// OAuth's error and description.
func reason(body []byte) (status, text string) {
	var ge googleError
	if json.Unmarshal(body, &ge) != nil || len(ge.Error) == 0 {
		return "", "no error body"
	}
	var ae apiError
	if json.Unmarshal(ge.Error, &ae) == nil && ae.Status != "" {
		return ae.Status, bounded(ae.Status + ": " + ae.Message)
	}
	var code string
	if json.Unmarshal(ge.Error, &code) == nil {
		return code, bounded(code + ": " + ge.Description)
	}
	return "", "unreadable error body"
}

// classify maps an HTTP status and Google's error body to the provider's
// sentinels.
func classify(code int, body []byte, what string) error {
	status, text := reason(body)
	msg := fmt.Sprintf("%s: HTTP %d: %s", what, code, text)
	switch {
	case code == http.StatusUnauthorized || code == http.StatusForbidden || status == "invalid_grant" || status == "unauthorized_client":
		return fmt.Errorf("%w: %s", provider.ErrPermissionDenied, msg)
	case code == http.StatusNotFound:
		return fmt.Errorf("%w: %s", provider.ErrNotFound, msg)
	case code == http.StatusTooManyRequests || code >= http.StatusInternalServerError || code == http.StatusRequestTimeout:
		return fmt.Errorf("%w: %s", provider.ErrUnavailable, msg)
	case code == http.StatusBadRequest:
		// Everything else a request carries is the admin's (audience,
		// scopes, lifetime) or checked before the call.
		return fmt.Errorf("%w: %s", provider.ErrMisconfigured, msg)
	}
	return errors.New(msg)
}

// bounded cuts a text from a server to a length fit for an error.
func bounded(s string) string {
	const n = 300
	s = strings.Join(strings.Fields(s), " ")
	if len(s) > n {
		s = s[:n] + "..."
	}
	return strings.ToValidUTF8(s, "?")
}
