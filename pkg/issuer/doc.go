// Package issuer is the cluster's authority over the credentials of the
// engines the driver hosts (PostgreSQL): it alone holds the admin
// credential; it decides whether a pod may have a role (the admin's
// allowed list, per-service-account quotas, and, in a cluster, that the
// pod exists on the asking node with that class); it creates roles from
// a verifier the node made, extends them while the node proves the pod
// alive, drops them on request, and reaps every role it made that expired
// or that no inventory record holds any more.
//
// The package knows nothing of how requests arrive: the driver calls an
// Issuer in its own process without a cluster (Local), the issuer
// Deployment serves the same Issuer to node plugins over HTTPS
// (pkg/issuer/remote).
//
// Every decision is made here (policy.go, reap.go, podcheck.go): which
// configured role a class names, the allowed list, the TTL bounds, the
// maxLive quota, the pod check, the node a role is bound to, how far an
// extension goes and which roles the reaper drops. The SQL is not:
// pkg/issuer/postgres, the engine, holds the admin connections and runs
// the statements with the decisions it is given.
//
// It may import pkg/issuer/postgres (the engine), pkg/issuer/use (the
// observation of use, which Run runs), pkg/provider and
// pkg/provider/postgres (the node's requests and grants), pkg/credential
// (the record of a credential, its Inventory's currency), pkg/audit and
// client-go; never pkg/issuer/remote (its transport imports it) nor
// anything of the node plugin (pkg/lease, pkg/driver, pkg/storage).
package issuer

import (
	"context"
	"errors"

	"github.com/ephemeral-secrets/csi-driver/pkg/credential"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// Caller is who asks, as the transport authenticated it.
type Caller struct {
	// Node is the node the asking node plugin runs on, from its
	// authenticated identity; empty in-process (the driver asks for its
	// own node's pods).
	Node string
}

// PodCheck verifies, with fresh data, that pod exists, runs on the
// caller's node as the service account given, and mounts a volume of this
// driver with the class ("namespace/name"). It returns an error wrapping
// provider.ErrPermissionDenied when it does not, provider.ErrUnavailable
// when it cannot tell. Nil (in-process) checks nothing: the node plugin
// took the pod's identity from kubelet.
type PodCheck func(ctx context.Context, c Caller, pod provider.Pod, class, volumeID string) error

// Inventory is where credentials are recorded outside the node (the
// cluster's Credential objects). Nil: no record but the database's own.
type Inventory interface {
	// Issuing records e as its role is created (the two at once), in
	// one write: a crash after it leaves a record whose deletion revokes
	// (e.Name is the role's name already); a role whose record failed is
	// dropped, and one left by a crash before its record is the
	// reaper's (it has no record: UntrackedGrace).
	Issuing(ctx context.Context, e credential.Record) error
	// Issued records that e's role exists until e.ExpiresAt (after a mint
	// or an extension). The Issuer calls it after its answer, from its
	// own writers (coalesced per lease, retried). It returns an error
	// wrapping credential.ErrRecordGone when e's record was deleted meanwhile (the
	// kill switch, the pod's deletion): the role is then dropped.
	Issued(ctx context.Context, e credential.Record) error
	// Dropped records that e's role is gone (its record may then go).
	Dropped(ctx context.Context, leaseID string) error
	// Tracked lists the lease IDs that have a record. A role the issuer
	// tagged whose lease has none (and is older than a grace) is reaped.
	Tracked(ctx context.Context) (map[string]bool, error)
}

// Withdrawals is what an Inventory may also tell (an optional interface):
// which pod volumes had their credential withdrawn, their record deleted
// while the pod lived (the kill switch). Mint refuses such a volume a new
// credential, so a kill holds even when the node was down or renewing
// when it happened. Without it (in-process, no cluster) nothing is
// refused for that reason.
type Withdrawals interface {
	// Withdrawn tells whether the credential of e's volume was withdrawn.
	// e is the record of the mint that asks, written already (Issuing):
	// the answer must know every mark written before that record (the
	// mark may be an instant old).
	Withdrawn(ctx context.Context, e credential.Record) (bool, error)
}

// ErrWithdrawn is the reason Mint gives (wrapped in
// provider.ErrPermissionDenied) for a volume whose credential was
// withdrawn.
var ErrWithdrawn = errors.New("the credential of this volume was withdrawn by deleting its Credential record")

// UseRecorder is what an Inventory may also do (an optional interface):
// record what the issuer saw of a credential's use.
type UseRecorder interface {
	// Used writes u into e's record (the Credential's status). The issuer
	// calls it only on a change that matters: the first use, a new source,
	// LastUsedAt at most once a minute, and once at revocation.
	Used(ctx context.Context, e credential.Record, u credential.Usage) error
	// UsedElsewhere tells the people of e's pod that e was used from addr,
	// an address none expected: a Warning event CredentialUsedElsewhere on
	// the pod naming addr and action ("alert", "revoke" or "record"), never
	// the credential.
	UsedElsewhere(ctx context.Context, e credential.Record, addr, action string) error
	// Withdraw deletes e's record while its pod lives: the kill switch
	// (its tombstone refuses the volume a new credential, the node's
	// watcher withdraws the files).
	Withdraw(ctx context.Context, e credential.Record) error
}
