package vault

import (
	"crypto/tls"
	"fmt"
	"net/http"
	"slices"
	"sort"
	"strings"
	"time"

	api "github.com/openbao/openbao/api/v2"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// DefaultAudience is the audience of the pod's service-account token the
// provider logs in with when the admin names none.
const DefaultAudience = "vault"

// TLSProfile is a named trust setting of the admin's that classes may
// select with vaultTLSProfile (a client certificate for one team's Vault
// role, say).
type TLSProfile struct {
	provider.TLS
	// Namespaces whose classes may use the profile; empty: every namespace.
	Namespaces []string `json:"namespaces,omitempty"`
}

// trustKey selects one prepared HTTP client: an address, and the profile
// a class named ("" for the address's own trust).
type trustKey struct{ address, profile string }

// trust is what the admin's configuration says about one (address,
// profile): the HTTP client that carries its TLS settings, and the server
// name a class may repeat.
type trust struct {
	client     *http.Client
	serverName string
}

// prepareTrust reads the admin's trust material once, at configuration
// load (each file bounded), and builds one HTTP client per address and
// profile. Nothing a class says is read from disk.
func prepareTrust(cfg Config) (map[trustKey]trust, error) {
	byAddr := map[string]provider.TLS{}
	for a, t := range cfg.TLS {
		a = strings.TrimRight(a, "/")
		if !slices.Contains(cfg.Addresses, a) {
			return nil, fmt.Errorf("vault: tls: %q is not one of the addresses", a)
		}
		byAddr[a] = t
	}
	out := map[trustKey]trust{}
	for _, addr := range cfg.Addresses {
		settings := map[string]provider.TLS{"": byAddr[addr]}
		for name, prof := range cfg.TLSProfiles {
			settings[name] = prof.TLS
		}
		for name, t := range settings {
			what := "vault: tls of " + addr
			if name != "" {
				what = "vault: tlsProfiles." + name
			}
			tc, err := t.Config(what)
			if err != nil {
				return nil, err
			}
			hc, err := httpClient(tc)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", what, err)
			}
			out[trustKey{addr, name}] = trust{client: hc, serverName: t.ServerName}
		}
	}
	return out, nil
}

// httpClient is the client for one address with the admin's TLS settings:
// no redirect is followed (the API client is also told not to), so the
// pod's token goes to that address only.
func httpClient(tc *tls.Config) (*http.Client, error) {
	base := api.NewConfig() // a pooled transport, HTTP/2, redirects not followed
	if base.Error != nil {
		return nil, base.Error
	}
	tr := base.HttpClient.Transport.(*http.Transport)
	own := tr.TLSClientConfig                                                                                                                 // keeps the NextProtos HTTP/2 set up
	own.RootCAs, own.Certificates, own.ServerName, own.InsecureSkipVerify = tc.RootCAs, tc.Certificates, tc.ServerName, tc.InsecureSkipVerify //nolint:gosec // the admin's
	base.HttpClient.Timeout = 30 * time.Second
	return base.HttpClient, nil
}

// checkClass refuses what a class may not ask for, before anything is
// read or dialled: trust material (files, verification off, another server
// name), another audience, a profile its namespace may not use, an
// address off the admin's list. Messages say what the admin configures
// instead and never quote a path.
func (p *Provider) checkClass(c classParams, namespace string) error {
	if len(c.files) > 0 {
		return fmt.Errorf("%w: %s names a file on the node, which a class may not do: the admin sets the CA and client "+
			"certificate of a Vault address in the backend configuration (vault.tls, or a vault.tlsProfiles entry the class names with %s)",
			provider.ErrInvalidParameters, c.files[0], TLSProfileParam)
	}
	if c.skipVerify != "" && c.skipVerify != "false" {
		return fmt.Errorf("%w: %s: a class cannot turn verification off; the admin decides it per address in the backend configuration "+
			"(vault.tls.<address>.insecureSkipVerify)", provider.ErrInvalidParameters, SkipTLSVerifyParam)
	}
	if c.audience != "" && c.audience != p.cfg.Audience {
		return fmt.Errorf("%w: %s: the pod's token for Vault has the audience the admin configured (%q); a class cannot choose another",
			provider.ErrInvalidParameters, AudienceParam, p.cfg.Audience)
	}
	addr, err := p.address(c)
	if err != nil {
		return err
	}
	if c.tlsProfile != "" {
		prof, ok := p.cfg.TLSProfiles[c.tlsProfile]
		if !ok {
			return fmt.Errorf("%w: %s %q is not one of the admin's profiles (%s)", provider.ErrInvalidParameters,
				TLSProfileParam, c.tlsProfile, strings.Join(profileNames(p.cfg), ", "))
		}
		if len(prof.Namespaces) > 0 && !slices.Contains(prof.Namespaces, namespace) {
			return fmt.Errorf("%w: %s %q is not for namespace %s", provider.ErrPermissionDenied, TLSProfileParam, c.tlsProfile, namespace)
		}
	}
	if c.serverName != "" && c.serverName != p.trust[trustKey{addr, c.tlsProfile}].serverName {
		return fmt.Errorf("%w: %s: the name a Vault certificate must carry is the admin's to set (vault.tls.<address>.serverName)",
			provider.ErrInvalidParameters, TLSServerNameParam)
	}
	return nil
}

func profileNames(cfg Config) []string {
	names := make([]string, 0, len(cfg.TLSProfiles))
	for n := range cfg.TLSProfiles {
		names = append(names, n)
	}
	sort.Strings(names)
	if len(names) == 0 {
		return []string{"none configured"}
	}
	return names
}

// address is the class's Vault address, which must be one of the admin's.
func (p *Provider) address(c classParams) (string, error) {
	addr := c.address
	if addr == "" {
		addr = p.cfg.Addresses[0]
	}
	if !slices.Contains(p.cfg.Addresses, addr) {
		return "", fmt.Errorf("%w: %s %q is not one of the admin's Vault addresses", provider.ErrPermissionDenied, AddressParam, addr)
	}
	return addr, nil
}

// client returns an API client for the class's address with the admin's
// trust for it, holding token. Renewals and revocations of a lease whose
// profile the admin has since removed use the address's own trust.
func (p *Provider) client(c classParams, token string) (*api.Client, error) {
	addr, err := p.address(c)
	if err != nil {
		return nil, err
	}
	t, ok := p.trust[trustKey{addr, c.tlsProfile}]
	if !ok {
		t = p.trust[trustKey{addr, ""}]
	}
	cl, err := api.NewClient(&api.Config{
		Address: addr, HttpClient: t.client, Timeout: 30 * time.Second,
		MaxRetries:         0,    // the lease manager retries, with backoff
		DisableRedirects:   true, // the token goes to the admin's address only
		DisableEnvironment: true, // the driver's VAULT_* variables do not apply
	})
	if err != nil {
		return nil, err
	}
	cl.SetToken(token)
	if c.namespace != "" {
		cl.SetNamespace(c.namespace)
	}
	return cl, nil
}
