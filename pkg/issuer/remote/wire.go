// Package remote is the cluster transport of the issuer: an HTTPS server
// the issuer Deployment runs in front of its Authority, and a Client the
// node plugin's postgres provider uses as its postgres.Minter. Requests
// and answers are the JSON of postgres.MintRequest, ExtendRequest,
// DropRequest and Grant; errors travel as a code that maps back to the
// provider's sentinels, so the CSI edge answers the same code as with an
// issuer in the driver's own process.
//
// The caller is authenticated by a bound service-account token of the
// driver's DaemonSet (TokenReview): its node is the one the token's pod
// runs on, never one the request names.
package remote

import (
	"context"
	"errors"
	"net/http"
	"strings"

	"github.com/ephemeral-secrets/csi-driver/pkg/issuer"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider/postgres"
)

// Authority is what the server asks: the issuer's decisions, whatever
// serves them (issuer.Issuer).
type Authority interface {
	Mint(ctx context.Context, c issuer.Caller, r postgres.MintRequest) (postgres.Grant, error)
	Extend(ctx context.Context, c issuer.Caller, r postgres.ExtendRequest) (postgres.Grant, error)
	Drop(ctx context.Context, c issuer.Caller, r postgres.DropRequest) error
}

// The paths of the three verbs.
const (
	MintPath   = "/v1/mint"
	ExtendPath = "/v1/extend"
	DropPath   = "/v1/drop"
)

// maxBody bounds a request's body: a request holds a few names, the
// class's parameters and a verifier.
const maxBody = 64 << 10

// errorBody is the JSON of a failed call.
type errorBody struct {
	Error wireError `json:"error"`
}

type wireError struct {
	// Code names the sentinel (see codes); empty for an internal error.
	Code    string `json:"code,omitempty"`
	Message string `json:"message"`
}

// errUnauthenticated marks a caller whose token is missing or not valid.
var errUnauthenticated = errors.New("unauthenticated")

// codes are the sentinels that cross the wire, their codes and statuses.
// The order matters: Unavailable first, as at the CSI edge.
var codes = []struct {
	err    error
	code   string
	status int
}{
	{provider.ErrUnavailable, "Unavailable", http.StatusServiceUnavailable},
	{errUnauthenticated, "Unauthenticated", http.StatusUnauthorized},
	{provider.ErrPermissionDenied, "PermissionDenied", http.StatusForbidden},
	{provider.ErrInvalidParameters, "InvalidParameters", http.StatusBadRequest},
	{provider.ErrNotFound, "NotFound", http.StatusNotFound},
	{provider.ErrNotRenewable, "NotRenewable", http.StatusConflict},
	{provider.ErrNotRevocable, "NotRevocable", http.StatusConflict},
	{provider.ErrMisconfigured, "Misconfigured", http.StatusInternalServerError},
}

// encodeError is the code and status of err; context errors of the
// server's own bound are Unavailable (the caller retries).
func encodeError(err error) (code string, status int) {
	for _, c := range codes {
		if errors.Is(err, c.err) {
			return c.code, c.status
		}
	}
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return "Unavailable", http.StatusServiceUnavailable
	}
	return "", http.StatusInternalServerError
}

// decodeError turns a failed answer back into an error wrapping the
// sentinel its code names. A node plugin the issuer does not authenticate
// is misconfigured (its token's audience or service account), not denied
// one pod's credential.
func decodeError(status int, e wireError) error {
	msg := "issuer: " + e.Message
	if e.Code == "Unauthenticated" {
		return &Error{msg: msg, status: status, sentinel: provider.ErrMisconfigured}
	}
	for _, c := range codes {
		if c.code == e.Code {
			return &Error{msg: msg, status: status, sentinel: c.err}
		}
	}
	if status == http.StatusServiceUnavailable || status == http.StatusBadGateway || status == http.StatusGatewayTimeout ||
		status == http.StatusTooManyRequests {
		return &Error{msg: msg, status: status, sentinel: provider.ErrUnavailable}
	}
	return &Error{msg: msg, status: status}
}

// Error is an issuer's refusal as the client sees it: its message and
// the sentinel (if any) it wraps.
type Error struct {
	msg      string
	status   int
	sentinel error
}

func (e *Error) Error() string { return e.msg }

// Unwrap returns the provider sentinel the issuer's code names.
func (e *Error) Unwrap() error { return e.sentinel }

// Status is the HTTP status of the answer.
func (e *Error) Status() int { return e.status }

// redact removes secret values (the verifier) from a message.
func redact(msg string, secrets ...string) string {
	for _, s := range secrets {
		if s != "" {
			msg = strings.ReplaceAll(msg, s, "[redacted]")
		}
	}
	return msg
}
