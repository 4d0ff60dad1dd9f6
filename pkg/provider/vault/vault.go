// Package vault is the provider for HashiCorp Vault and OpenBao (one HTTP
// API): it logs in with the pod's own service-account token (kubernetes or
// jwt auth method), reads any secrets engine's paths, renews every lease
// and the login token, and revokes the token (and so every lease it
// created) when the pod is gone. Parameters are those of
// hashicorp/vault-csi-provider.
//
// It imports pkg/provider (the contract) and pkg/volumepath (the rule for
// the file names a class asks for), nothing else of ours.
package vault

import (
	"context"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"sort"
	"strings"
	"time"

	api "github.com/openbao/openbao/api/v2"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// Name is the provider name a SecretProviderClass gives as spec.provider.
const Name = "vault"

// Config is the admin's configuration of the vault provider.
type Config struct {
	// Addresses are the Vault/OpenBao servers classes may name; a class
	// without vaultAddress gets the first. The pod's token is only ever
	// sent to these.
	Addresses []string `json:"addresses"`
	// Audience of the pod's service-account token the provider logs in
	// with (default "vault"); a class cannot choose another.
	Audience string `json:"audience,omitempty"`
	// TLS is the trust material of each address (CA, client certificate,
	// server name, verification off), keyed by address; an address without
	// an entry is verified against the system's roots.
	TLS map[string]provider.TLS `json:"tls,omitempty"`
	// TLSProfiles are named trust settings a class may select with
	// vaultTLSProfile.
	TLSProfiles map[string]TLSProfile `json:"tlsProfiles,omitempty"`
}

// Provider implements provider.Provider for Vault and OpenBao.
type Provider struct {
	cfg   Config
	trust map[trustKey]trust
	now   func() time.Time
}

var _ provider.Provider = (*Provider)(nil)

// New checks cfg, reads its trust material and returns a provider.
func New(cfg Config) (*Provider, error) {
	if len(cfg.Addresses) == 0 {
		return nil, errors.New("vault: no addresses configured")
	}
	for i, a := range cfg.Addresses {
		if !strings.HasPrefix(a, "https://") && !strings.HasPrefix(a, "http://") {
			return nil, fmt.Errorf("vault: address %q is not an http(s) URL", a)
		}
		cfg.Addresses[i] = strings.TrimRight(a, "/")
	}
	if cfg.Audience == "" {
		cfg.Audience = DefaultAudience
	}
	trust, err := prepareTrust(cfg)
	if err != nil {
		return nil, err
	}
	return &Provider{cfg: cfg, trust: trust, now: time.Now}, nil
}

// leaseRef is one lease the volume holds.
type leaseRef struct {
	ID        string `json:"id"`
	Renewable bool   `json:"renewable"`
	TTL       int    `json:"ttl"` // seconds, as first granted: the increment asked for on renewal
}

// Handle keys.
const (
	hToken     = "token" // secret
	hTokenTTL  = "tokenTTL"
	hRenewable = "tokenRenewable"
	hLeases    = "leases"
)

// Issue logs in with the pod's token and reads every object's path, once
// per distinct path.
func (p *Provider) Issue(ctx context.Context, req provider.Request) (provider.Lease, error) {
	c, err := parseParams(req.Params)
	if err != nil {
		return provider.Lease{}, err
	}
	if err := p.checkClass(c, req.Pod.Namespace); err != nil {
		return provider.Lease{}, err
	}
	jwt, err := provider.PodToken(req, p.cfg.Audience)
	if err != nil {
		return provider.Lease{}, err
	}
	cl, err := p.client(c, "")
	if err != nil {
		return provider.Lease{}, err
	}
	login, err := cl.Logical().WriteWithContext(ctx, "auth/"+c.authMount+"/login", map[string]any{"role": c.role, "jwt": jwt})
	if err != nil {
		return provider.Lease{}, classify(err, "login", true)
	}
	if login == nil || login.Auth == nil || login.Auth.ClientToken == "" {
		return provider.Lease{}, fmt.Errorf("%w: login at auth/%s returned no token", provider.ErrPermissionDenied, c.authMount)
	}
	token := login.Auth.ClientToken
	cl.SetToken(token)
	now := p.now()
	l := provider.Lease{
		Values: map[string]string{},
		Role:   c.authMount + "/" + c.role,
		Handle: map[string]string{
			hToken: token, hTokenTTL: fmt.Sprint(login.Auth.LeaseDuration), hRenewable: fmt.Sprint(login.Auth.Renewable),
		},
		IssuedAt: now,
	}
	fail := func(err error) (provider.Lease, error) {
		// Nothing half-made survives: the token takes its leases with it.
		_ = cl.Auth().Token().RevokeSelfWithContext(context.WithoutCancel(ctx), "")
		return provider.Lease{}, err
	}
	var leases []leaseRef
	responses := map[string]*api.Secret{}
	for _, o := range c.objects {
		key := requestKey(o)
		secret, ok := responses[key]
		if !ok {
			if secret, err = read(ctx, cl, o); err != nil {
				return fail(err)
			}
			responses[key] = secret
			if secret.LeaseID != "" {
				leases = append(leases, leaseRef{ID: secret.LeaseID, Renewable: secret.Renewable, TTL: secret.LeaseDuration})
			}
		}
		v, err := value(secret, o)
		if err != nil {
			return fail(err)
		}
		l.Values[o.ObjectName] = v
	}
	lj, _ := json.Marshal(leases)
	l.Handle[hLeases] = string(lj)
	l.ExpiresAt = expiry(now, login.Auth.LeaseDuration, leases)
	if c.renewBefore > 0 && !l.ExpiresAt.IsZero() {
		l.RenewAt = l.ExpiresAt.Add(-c.renewBefore)
	}
	return l, nil
}

// requestKey identifies one Vault request, shared by the objects that make it.
func requestKey(o Object) string {
	args, _ := json.Marshal(o.SecretArgs) // map keys marshal sorted
	m := o.Method
	if m == "" {
		m = http.MethodGet
	}
	return m + " " + o.SecretPath + " " + string(args)
}

func read(ctx context.Context, cl *api.Client, o Object) (*api.Secret, error) {
	var secret *api.Secret
	var err error
	if o.Method == "" || o.Method == http.MethodGet {
		secret, err = cl.Logical().ReadWithContext(ctx, o.SecretPath)
	} else {
		secret, err = cl.Logical().WriteWithContext(ctx, o.SecretPath, o.SecretArgs)
	}
	if err != nil {
		return nil, classify(err, "reading "+o.SecretPath, false)
	}
	if secret == nil || secret.Data == nil {
		return nil, fmt.Errorf("%w: nothing at %s", provider.ErrNotFound, o.SecretPath)
	}
	return secret, nil
}

// value picks an object's content out of a response as vault-csi-provider
// does: the whole data as JSON without secretKey; with it, the key of
// data, or of data.data for a KV version 2 read.
func value(s *api.Secret, o Object) (string, error) {
	var v any = s.Data
	if o.SecretKey != "" {
		var ok bool
		v, ok = s.Data[o.SecretKey]
		if !ok {
			if inner, isMap := s.Data["data"].(map[string]any); isMap {
				v, ok = inner[o.SecretKey]
			}
		}
		if !ok {
			return "", fmt.Errorf("%w: key %q not in the response of %s", provider.ErrNotFound, o.SecretKey, o.SecretPath)
		}
	}
	var out string
	switch t := v.(type) {
	case string:
		out = t
	default:
		b, err := json.Marshal(t)
		if err != nil {
			return "", err
		}
		out = string(b)
	}
	switch o.Encoding {
	case "base64":
		b, err := base64.StdEncoding.DecodeString(out)
		if err != nil {
			return "", fmt.Errorf("%w: %s: value is not base64", provider.ErrInvalidParameters, o.ObjectName)
		}
		out = string(b)
	case "hex":
		b, err := hex.DecodeString(out)
		if err != nil {
			return "", fmt.Errorf("%w: %s: value is not hex", provider.ErrInvalidParameters, o.ObjectName)
		}
		out = string(b)
	}
	return out, nil
}

// expiry is when the first of the token and the leases runs out.
func expiry(now time.Time, tokenTTL int, leases []leaseRef) time.Time {
	var ttls []int
	if tokenTTL > 0 {
		ttls = append(ttls, tokenTTL)
	}
	for _, l := range leases {
		if l.TTL > 0 {
			ttls = append(ttls, l.TTL)
		}
	}
	if len(ttls) == 0 {
		return time.Time{}
	}
	sort.Ints(ttls)
	return now.Add(time.Duration(ttls[0]) * time.Second)
}

// Renew renews the token and every lease by their first TTL. Where Vault
// grants less than half of that (a max TTL is near), or something cannot
// be renewed, it returns ErrNotRenewable: the manager reads fresh
// credentials, swaps them in and revokes these.
func (p *Provider) Renew(ctx context.Context, l provider.Lease) (provider.Lease, error) {
	c, err := parseParams(l.Params)
	if err != nil {
		return l, err
	}
	var leases []leaseRef
	if err := json.Unmarshal([]byte(l.Handle[hLeases]), &leases); err != nil {
		return l, fmt.Errorf("%w: unreadable lease list", provider.ErrNotRenewable)
	}
	cl, err := p.client(c, l.Handle[hToken])
	if err != nil {
		return l, err
	}
	now := p.now()
	var tokenTTL int
	fmt.Sscan(l.Handle[hTokenTTL], &tokenTTL)
	if l.Handle[hRenewable] == "true" && tokenTTL > 0 {
		s, err := cl.Auth().Token().RenewSelfWithContext(ctx, tokenTTL)
		if err != nil {
			return l, classify(err, "renewing the token", false)
		}
		if s == nil || s.Auth == nil || s.Auth.LeaseDuration < tokenTTL/2 {
			return l, fmt.Errorf("%w: the token is near its max TTL", provider.ErrNotRenewable)
		}
	}
	granted := []leaseRef{}
	for _, lr := range leases {
		if !lr.Renewable {
			return l, fmt.Errorf("%w: lease %s is not renewable", provider.ErrNotRenewable, lr.ID)
		}
		s, err := cl.Sys().RenewWithContext(ctx, lr.ID, lr.TTL)
		if err != nil {
			return l, classify(err, "renewing a lease", false)
		}
		if s == nil || s.LeaseDuration < lr.TTL/2 {
			return l, fmt.Errorf("%w: lease %s is near its max TTL", provider.ErrNotRenewable, lr.ID)
		}
		granted = append(granted, leaseRef{ID: lr.ID, TTL: s.LeaseDuration})
	}
	l.ExpiresAt = expiry(now, tokenTTL, granted)
	if c.renewBefore > 0 && !l.ExpiresAt.IsZero() {
		l.RenewAt = l.ExpiresAt.Add(-c.renewBefore)
	}
	return l, nil
}

// Revoke revokes the volume's token, which revokes every lease it created.
// A token Vault no longer knows is already revoked (with its leases).
func (p *Provider) Revoke(ctx context.Context, l provider.Lease) error {
	token := l.Handle[hToken]
	if token == "" {
		// An issue interrupted before the login token was recorded: there is
		// nothing to present to Vault; its TTL ends it.
		return fmt.Errorf("%w: the login token of an interrupted issue was never recorded", provider.ErrNotRevocable)
	}
	c, err := parseParams(l.Params)
	if err != nil {
		return err
	}
	cl, err := p.client(c, token)
	if err != nil {
		return err
	}
	err = cl.Auth().Token().RevokeSelfWithContext(ctx, "")
	var re *api.ResponseError
	if errors.As(err, &re) && re.StatusCode == http.StatusForbidden {
		return nil // an unknown (expired or revoked) token: its leases went with it
	}
	if err != nil {
		return classify(err, "revoking the token", false)
	}
	return nil
}

// classify maps a Vault error to the provider's sentinels, with Vault's own
// reason (its messages never hold the token or the JWT we sent).
func classify(err error, what string, login bool) error {
	var re *api.ResponseError
	if !errors.As(err, &re) {
		return fmt.Errorf("%w: %s: %v", provider.ErrUnavailable, what, err)
	}
	reason := strings.Join(re.Errors, "; ")
	switch {
	case re.StatusCode == http.StatusTooManyRequests || re.StatusCode >= 500:
		return fmt.Errorf("%w: %s: Vault answered %d: %s", provider.ErrUnavailable, what, re.StatusCode, reason)
	case login && (re.StatusCode == http.StatusBadRequest || re.StatusCode == http.StatusForbidden || re.StatusCode == http.StatusUnauthorized):
		return fmt.Errorf("%w: %s refused: %s", provider.ErrPermissionDenied, what, reason)
	case re.StatusCode == http.StatusForbidden:
		return fmt.Errorf("%w: %s: %s", provider.ErrPermissionDenied, what, reason)
	case re.StatusCode == http.StatusNotFound:
		return fmt.Errorf("%w: %s: %s", provider.ErrNotFound, what, reason)
	default:
		return fmt.Errorf("%s: Vault answered %d: %s", what, re.StatusCode, reason)
	}
}
