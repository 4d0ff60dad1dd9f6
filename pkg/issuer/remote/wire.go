// Package remote is the cluster transport of the issuer: an HTTPS server
// the issuer Deployment runs in front of its Authority, and a Client the
// node plugin's postgres provider uses as its postgres.Minter (package
// wire, which the node plugin links without this one). Requests
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

	"github.com/ephemeral-secrets/csi-driver/pkg/issuer"
	"github.com/ephemeral-secrets/csi-driver/pkg/issuer/remote/wire"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider/postgres"
)

// Authority is what the server asks: the issuer's decisions, whatever
// serves them (issuer.Issuer).
type Authority interface {
	Mint(ctx context.Context, c issuer.Caller, r postgres.MintRequest) (postgres.Grant, error)
	Extend(ctx context.Context, c issuer.Caller, r postgres.ExtendRequest) (postgres.Grant, error)
	Drop(ctx context.Context, c issuer.Caller, r postgres.DropRequest) error
}

// maxBody bounds a request's body (wire.MaxBody).
const maxBody = wire.MaxBody

// The protocol and the node plugin's end live in package wire (which the
// node plugin links without the issuer); these are their names here.
const (
	MintPath   = wire.MintPath
	ExtendPath = wire.ExtendPath
	DropPath   = wire.DropPath
)

type (
	errorBody = wire.ErrorBody
	wireError = wire.WireError
	// Error is an issuer's refusal as the client sees it.
	Error = wire.Error
	// Client is the node plugin's postgres.Minter (wire.Client).
	Client = wire.Client
	// ClientOptions shape a Client.
	ClientOptions = wire.ClientOptions
	// Roots gives the PEM certificates that sign the issuer's serving
	// certificate.
	Roots = wire.Roots
)

var (
	errUnauthenticated = wire.ErrUnauthenticated
	encodeError        = wire.EncodeError
	redact             = wire.Redact
	// NewClient checks o and returns a Client.
	NewClient = wire.NewClient
	// RootsFile reads the roots from a file at each call.
	RootsFile = wire.RootsFile
)
