// Package use sees each credential the issuer minted being used: it
// samples, once per interval and in one query per connection, the
// sessions the roles it tagged have open in PostgreSQL, and keeps per
// live credential its first use, its last, the distinct client addresses
// its sessions came from (bounded) and the most sessions open at once.
// A session from an address none expected (not its pod's IPs, not its
// node's addresses, not in the connection's expectedSources) is a foreign
// use: the role's onForeignUse says whether the pod is warned (alert),
// the credential also killed at once (revoke: its sessions ended, its
// record withdrawn or its files, its role dropped) or only recorded
// (record). Each step goes to the audit trail (stage use), to the
// metrics, and, through the Recorder, to the credential's record. When a
// role is gone (dropped, reaped, killed) its summary is written: used or
// never used, sessions seen, first and last use, sources.
//
// What one credential's use costs is bounded, however many addresses a
// thief uses: 64 addresses are remembered (the first 8 listed in its
// record, the others counted); past them a session from an address not
// remembered is counted once (droppedSources), with one audit record
// that the addresses outgrew the memory. Its first foreign use is
// reported at once (the audit record, the metric, the pod's Warning, and
// with revoke the kill); the next ones at most once a minute, each
// report telling how many foreign addresses came since, and those held
// back when its role goes are told before its summary. With revoke every
// foreign use is acted on at once. The pod's Warning is sent off the
// sampling's path, and one that fails is tried again with backoff, 5
// times in all.
//
// When the admin cannot see other roles' sessions (no pg_read_all_stats,
// not a superuser) or sampling fails, it says so (the blind gauge, a log
// line at each change) and never calls a credential unused
// (credential.Usage.Sampled is false).
//
// It imports pkg/issuer/postgres (the engine, which holds the SQL),
// pkg/provider/postgres (the provider's name in the records),
// pkg/credential (the record it describes), pkg/audit and client-go (the
// pod's and node's addresses, kube.go); pkg/issuer runs it and
// gives it its Recorder (issuer.UseRecorder), never the other way.
package use

import (
	"context"
	"errors"
	"net/netip"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/credential"
	pgengine "github.com/ephemeral-secrets/csi-driver/pkg/issuer/postgres"
)

// Engine is what the tracker asks of the issuer's engine
// (*pgengine.Admin).
type Engine interface {
	// Connections lists the configured connections' names.
	Connections() []string
	// Lookup returns a role's configuration (onForeignUse, unusedAfter)
	// and its connection's (expectedSources).
	Lookup(connection, role string) (*pgengine.Connection, *pgengine.Role, error)
	// SampleSessions looks once at the sessions of the roles tagged for
	// connection.
	SampleSessions(ctx context.Context, connection string) (pgengine.Sample, error)
	// EndSessions refuses a role's logins and ends its sessions.
	EndSessions(ctx context.Context, connection, name, leaseID string) (int, error)
}

// Recorder writes what the tracker saw into the credential's record and
// tells its pod (issuer.UseRecorder: the cluster's inventory). Nil
// in-process.
type Recorder interface {
	Used(ctx context.Context, e credential.Record, u credential.Usage) error
	// UsedElsewhere is called off the sampling's path, and again (with
	// backoff, a few times) when it fails.
	UsedElsewhere(ctx context.Context, e credential.Record, addr, action string) error
	Withdraw(ctx context.Context, e credential.Record) error
}

// Resolver tells the addresses a credential's sessions are expected from
// beside its connection's expectedSources: its pod's IPs and its node's
// addresses (KubeResolver). The tracker asks once per credential, at the
// first session it sees of it, and keeps the answer. Nil: the
// connection's expectedSources only (in-process, no cluster).
type Resolver interface {
	Expected(ctx context.Context, e credential.Record) ([]netip.Addr, error)
}

// ErrNoPodAddress is what a Resolver returns (wrapped, with the addresses
// it has) for a pod that exists but has no IP yet: kubelet mounts its
// volumes, and so mints its credential, before the pod's sandbox has an
// address. The tracker then waits (PodAddressWait at most, from the
// credential's issue) before it calls a source foreign.
var ErrNoPodAddress = errors.New("the pod has no IP yet")

// PodAddressWait bounds how long a credential's new sources wait for its
// pod's IPs: a pod that has none by then (stuck before its sandbox) is
// judged on its node's addresses and the networks alone.
const PodAddressWait = 30 * time.Second

// Meter counts what the tracker sees (*metrics.Use; nil records
// nothing). Foreign counts the foreign-use reports (one per credential a
// minute at most, but with revoke); Blind is reset (false) for each
// connection when Run returns: a tracker that stopped sampling (its
// leadership lost) is not blind.
type Meter interface {
	Sessions(conn string, n int)
	FirstUse(conn string)
	Foreign(conn, role, action string)
	NeverUsed(conn, role string)
	Unused(conn, role string)
	Blind(conn string, blind bool)
	Sampled(conn string, d time.Duration)
}
