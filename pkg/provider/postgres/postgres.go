// Package postgres is the node side of the built-in provider of
// PostgreSQL roles: one role per pod volume, created with a VALID UNTIL,
// extended on renewal and dropped at revocation.
//
// Its one job is the node's minter: the Provider (node.go) makes each
// role's password and its SCRAM-SHA-256 verifier and asks a Minter for
// the role; the password never leaves the node. It also defines what the
// node and the issuer say to each other (minter.go: Minter, its requests
// and Grant, the class parameters, RoleName).
//
// The issuer's side lives elsewhere: its decisions in pkg/issuer, its SQL
// engine (admin connections, statements, tags, retries) in
// pkg/issuer/postgres. This package may import only the standard library
// and pkg/provider: no database driver is linked into a node plugin that
// asks a cluster issuer.
package postgres

import (
	"crypto/rand"
	"errors"
	"strings"
)

// Name is the provider name a SecretProviderClass gives as spec.provider.
const Name = "postgres"

// Class parameters.
const (
	ConnectionParam = "connection"
	RoleParam       = "role"
	TTLParam        = "ttl"
)

// RoleName is the PostgreSQL role created for a lease ID: "esc_" and the
// ID with '-' as '_', at most 63 bytes, keeping the random tail.
func RoleName(leaseID string) string {
	s := "esc_" + strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= '0' && r <= '9' {
			return r
		}
		return '_'
	}, strings.ToLower(leaseID))
	if len(s) > 63 {
		s = s[:30] + s[len(s)-33:]
	}
	return s
}

// newPassword returns 32 base32 characters (160 bits), safe inside the
// single quotes of a creation statement.
func newPassword() string {
	return rand.Text() + rand.Text()[:6]
}

// redact removes the password and its verifier from an error's text: a
// Minter's error should never carry them (the issuer scrubs the verifier
// from the statements it quotes), and this makes sure.
func redact(err error, secrets ...string) error {
	msg := err.Error()
	for _, s := range secrets {
		if s != "" {
			msg = strings.ReplaceAll(msg, s, "[redacted]")
		}
	}
	if msg == err.Error() {
		return err
	}
	return errors.New(msg)
}
