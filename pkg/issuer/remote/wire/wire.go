// Package wire is the issuer's HTTPS protocol as both of its ends speak
// it: the paths of the three verbs, the JSON of a failed call and the
// codes that map back to the provider's sentinels, and the node plugin's
// end, Client, a postgres.Minter. It imports pkg/provider (the
// sentinels) and pkg/provider/postgres (the requests and the grant), and
// neither the issuer nor a typed Kubernetes client, so the node plugin
// links neither (pkg/issuer/remote is the issuer's end: the server, its
// authentication and its certificates).
package wire

import (
	"context"
	"errors"
	"net/http"
	"strings"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// Audience is the audience of the tokens node plugins present to the
// issuer by default (the CSIDriver's tokenRequests do not carry it: the
// driver pod's projected token does).
const Audience = "ephemeral-secrets.csi.dev/issuer"

// The paths of the three verbs.
const (
	MintPath   = "/v1/mint"
	ExtendPath = "/v1/extend"
	DropPath   = "/v1/drop"
)

// MaxBody bounds a request's body and an answer's: a request holds a few
// names, the class's parameters and a verifier.
const MaxBody = 64 << 10

// ErrorBody is the JSON of a failed call.
type ErrorBody struct {
	Error WireError `json:"error"`
}

// WireError is a failed call's error as it crosses the wire.
type WireError struct {
	// Code names the sentinel (see codes); empty for an internal error.
	Code    string `json:"code,omitempty"`
	Message string `json:"message"`
}

// ErrUnauthenticated marks a caller whose token is missing or not valid.
var ErrUnauthenticated = errors.New("unauthenticated")

// codes are the sentinels that cross the wire, their codes and statuses.
// The order matters: Unavailable first, as at the CSI edge.
var codes = []struct {
	err    error
	code   string
	status int
}{
	{provider.ErrUnavailable, "Unavailable", http.StatusServiceUnavailable},
	{ErrUnauthenticated, "Unauthenticated", http.StatusUnauthorized},
	{provider.ErrPermissionDenied, "PermissionDenied", http.StatusForbidden},
	{provider.ErrInvalidParameters, "InvalidParameters", http.StatusBadRequest},
	{provider.ErrNotFound, "NotFound", http.StatusNotFound},
	{provider.ErrNotRenewable, "NotRenewable", http.StatusConflict},
	{provider.ErrNotRevocable, "NotRevocable", http.StatusConflict},
	{provider.ErrMisconfigured, "Misconfigured", http.StatusInternalServerError},
}

// EncodeError is the code and status of err; context errors of the
// server's own bound are Unavailable (the caller retries).
func EncodeError(err error) (code string, status int) {
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

// DecodeError turns a failed answer back into an error wrapping the
// sentinel its code names. A node plugin the issuer does not authenticate
// is misconfigured (its token's audience or service account), not denied
// one pod's credential.
func DecodeError(status int, e WireError) error {
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

// Redact removes secret values (the verifier) from a message.
func Redact(msg string, secrets ...string) string {
	for _, s := range secrets {
		if s != "" {
			msg = strings.ReplaceAll(msg, s, "[redacted]")
		}
	}
	return msg
}
