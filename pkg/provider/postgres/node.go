package postgres

import (
	"context"
	"fmt"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// Handle keys: what the node keeps to renew and drop a role after a
// restart. Nothing secret.
const (
	handleConnection = "connection"
	handleRole       = "role"
	handleName       = "name"
	handleNotAfter   = "notAfter"
	handleClass      = "class"
	handleNamespace  = "namespace"
	handlePod        = "pod"
	handleUID        = "uid"
	handleSA         = "serviceAccount"
	handleVolume     = "volumeID"
)

// Provider is the node side of the postgres provider (provider.Provider):
// it makes each role's password and its SCRAM-SHA-256 verifier, and asks
// its Minter for the role. The password stays in the node's memory and
// the volume's tmpfs; the Minter sees only the verifier.
type Provider struct {
	m Minter
}

var _ provider.Provider = (*Provider)(nil)

// NewNode returns the node side over m (issuer.Issuer.Local in the
// driver's process, a client of the cluster's issuer otherwise).
func NewNode(m Minter) *Provider { return &Provider{m: m} }

// Issue makes a password, sends its verifier to the Minter, and returns
// the role's name and password (Values) and where to dial it (Info).
func (p *Provider) Issue(ctx context.Context, req provider.Request) (provider.Lease, error) {
	password := newPassword()
	verifier, err := scramVerifier(password)
	if err != nil {
		return provider.Lease{}, err
	}
	g, err := p.m.Mint(ctx, MintRequest{
		LeaseID: req.LeaseID, VolumeID: req.VolumeID, Class: req.Class, Params: req.Params, Pod: req.Pod, Verifier: verifier,
	})
	if err != nil {
		return provider.Lease{}, redact(err, password, verifier)
	}
	return provider.Lease{
		Values: map[string]string{"username": g.Name, "password": password},
		Info:   map[string]string{"host": g.Host, "port": g.Port, "database": g.Database},
		Handle: map[string]string{
			handleConnection: req.Params[ConnectionParam], handleRole: req.Params[RoleParam], handleName: g.Name,
			handleNotAfter: g.NotAfter.Format(time.RFC3339), handleClass: req.Class,
			handleNamespace: req.Pod.Namespace, handlePod: req.Pod.Name, handleUID: req.Pod.UID, handleSA: req.Pod.ServiceAccount,
			handleVolume: req.VolumeID,
		},
		Role:      g.Role,
		IssuedAt:  g.IssuedAt,
		ExpiresAt: g.ExpiresAt,
	}, nil
}

// Renew asks the Minter to extend the role (the proof that the pod is
// alive); it returns ErrNotRenewable when the role reached its maxTTL.
func (p *Provider) Renew(ctx context.Context, l provider.Lease) (provider.Lease, error) {
	g, err := p.m.Extend(ctx, ExtendRequest{
		LeaseID: l.ID, VolumeID: l.Handle[handleVolume], Params: l.Params, Name: l.Handle[handleName], ExpiresAt: l.ExpiresAt,
		Pod: provider.Pod{Namespace: l.Handle[handleNamespace], Name: l.Handle[handlePod],
			UID: l.Handle[handleUID], ServiceAccount: l.Handle[handleSA]},
	})
	if err != nil {
		return l, err
	}
	if !g.ExpiresAt.After(l.ExpiresAt) {
		return l, fmt.Errorf("%w: the extension did not move the expiry", provider.ErrNotRenewable)
	}
	l.ExpiresAt = g.ExpiresAt
	return l, nil
}

// Revoke asks the Minter to drop the role. A lease with only ID and
// Params (an issue interrupted before its answer was recorded) names the
// role by its lease ID.
func (p *Provider) Revoke(ctx context.Context, l provider.Lease) error {
	params := l.Params
	if params == nil {
		params = map[string]string{ConnectionParam: l.Handle[handleConnection], RoleParam: l.Handle[handleRole]}
	}
	return p.m.Drop(ctx, DropRequest{LeaseID: l.ID, Params: params, Name: l.Handle[handleName]})
}
