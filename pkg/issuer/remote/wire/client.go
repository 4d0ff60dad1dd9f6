package wire

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider/postgres"
)

// Roots gives the PEM certificates that sign the issuer's serving
// certificate (the issuer's ConfigMap, or a mounted file).
type Roots func(ctx context.Context) ([]byte, error)

// RootsFile reads the roots from a file at each call.
func RootsFile(path string) Roots {
	return func(context.Context) ([]byte, error) { return os.ReadFile(path) }
}

// ClientOptions shape a Client.
type ClientOptions struct {
	// URL is the issuer's base address, https://host:port.
	URL string
	// TokenFile is the node plugin's projected service-account token
	// (audience Audience), read at every call: kubelet rotates it.
	TokenFile string
	// Roots verify the issuer's certificate.
	Roots Roots
	// Timeout bounds one call (default 30s).
	Timeout time.Duration
	// Dial opens connections (default: net.Dialer's, 10s).
	Dial Dial
}

// Client is the node plugin's postgres.Minter: it asks the issuer
// Deployment over HTTPS. An issuer it cannot reach is ErrUnavailable:
// kubelet retries the publish, the lease manager its queued revocation.
type Client struct {
	o    ClientOptions
	base *url.URL

	mu        sync.Mutex
	rootsSum  [sha256.Size]byte
	http      *http.Client
	refreshed time.Time
}

var _ postgres.Minter = (*Client)(nil)

// NewClient checks o and returns a Client. It reads nothing yet.
func NewClient(o ClientOptions) (*Client, error) {
	u, err := url.Parse(o.URL)
	if err != nil || u.Scheme != "https" || u.Host == "" {
		return nil, fmt.Errorf("issuer address %q: an https://host:port URL is required", o.URL)
	}
	if o.TokenFile == "" || o.Roots == nil {
		return nil, errors.New("issuer client: a token file and the issuer's roots are required")
	}
	if o.Timeout <= 0 {
		o.Timeout = 30 * time.Second
	}
	if o.Dial == nil {
		o.Dial = (&net.Dialer{Timeout: 10 * time.Second}).DialContext
	}
	return &Client{o: o, base: u}, nil
}

// Mint asks the issuer for a role.
func (c *Client) Mint(ctx context.Context, r postgres.MintRequest) (postgres.Grant, error) {
	var g postgres.Grant
	err := c.call(ctx, MintPath, r, &g, r.Verifier)
	return g, err
}

// Extend asks the issuer to extend a role.
func (c *Client) Extend(ctx context.Context, r postgres.ExtendRequest) (postgres.Grant, error) {
	var g postgres.Grant
	err := c.call(ctx, ExtendPath, r, &g)
	return g, err
}

// Drop asks the issuer to drop a role.
func (c *Client) Drop(ctx context.Context, r postgres.DropRequest) error {
	return c.call(ctx, DropPath, r, &struct{}{})
}

// rootsRefresh is how often roots are read again after a failed
// verification (the issuer's certificate may have a new signer).
const rootsRefresh = 30 * time.Second

func (c *Client) call(ctx context.Context, path string, in, out any, secrets ...string) error {
	token, err := os.ReadFile(c.o.TokenFile)
	if err != nil {
		return fmt.Errorf("%w: reading the issuer token: %v", provider.ErrMisconfigured, err)
	}
	body, err := json.Marshal(in)
	if err != nil {
		return err
	}
	hc, err := c.client(ctx, false)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, c.o.Timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.base.JoinPath(path).String(), bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(token)))
	resp, err := hc.Do(req)
	if err != nil {
		var unknown x509.UnknownAuthorityError
		if errors.As(err, &unknown) {
			_, _ = c.client(ctx, true) // the next call uses the roots as they are now
		}
		// The URL is ours, not secret; the request's body never appears.
		return fmt.Errorf("%w: issuer: %v", provider.ErrUnavailable, Redact(err.Error(), secrets...))
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, MaxBody))
	if err != nil {
		return fmt.Errorf("%w: issuer: reading the answer: %v", provider.ErrUnavailable, err)
	}
	if resp.StatusCode != http.StatusOK {
		var eb ErrorBody
		if json.Unmarshal(data, &eb) != nil || eb.Error.Message == "" {
			eb.Error.Message = http.StatusText(resp.StatusCode)
		}
		eb.Error.Message = Redact(eb.Error.Message, secrets...)
		return DecodeError(resp.StatusCode, eb.Error)
	}
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("%w: issuer: the answer is not JSON of the expected shape", provider.ErrUnavailable)
	}
	return nil
}

// client returns the HTTP client verifying with the current roots; it
// reads them the first time, and again when refresh is asked (at most
// every rootsRefresh).
func (c *Client) client(ctx context.Context, refresh bool) (*http.Client, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.http != nil && (!refresh || time.Since(c.refreshed) < rootsRefresh) {
		return c.http, nil
	}
	pem, err := c.o.Roots(ctx)
	if err != nil {
		if c.http != nil {
			return c.http, nil
		}
		return nil, fmt.Errorf("%w: reading the issuer's certificate: %v", provider.ErrUnavailable, err)
	}
	c.refreshed = time.Now()
	sum := sha256.Sum256(pem)
	if c.http != nil && sum == c.rootsSum {
		return c.http, nil
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		if c.http != nil {
			return c.http, nil
		}
		return nil, fmt.Errorf("%w: the issuer's certificate holds no PEM certificate", provider.ErrMisconfigured)
	}
	if c.http != nil {
		c.http.CloseIdleConnections()
	}
	c.http = &http.Client{
		Transport: &http.Transport{
			TLSClientConfig:     &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12},
			DialContext:         c.o.Dial,
			TLSHandshakeTimeout: 10 * time.Second,
			MaxIdleConnsPerHost: 8,
			IdleConnTimeout:     90 * time.Second,
			ForceAttemptHTTP2:   true,
			Proxy:               nil, // the token goes to the issuer only
		},
		// A redirect would carry the token elsewhere.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	c.rootsSum = sum
	return c.http, nil
}
