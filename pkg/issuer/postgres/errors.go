package postgres

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// disposition is what an error of PostgreSQL's means for the caller.
type disposition int

const (
	// transient: retried inside the provider while the call's deadline
	// allows, then ErrUnavailable.
	transient disposition = iota + 1
	// unavailable: ErrUnavailable at once; the lease manager or kubelet
	// retries later.
	unavailable
	// misconfigured: the admin's statements or credentials are wrong
	// (ErrMisconfigured); no retry helps until the admin fixes them.
	misconfigured
)

// sqlstateClasses says what every SQLSTATE class means here (PostgreSQL
// documentation, appendix A). Each row is chosen on purpose and has a
// test; codes in sqlstateCodes override their class.
var sqlstateClasses = map[string]disposition{
	"01": misconfigured, // warning: never an error; the statements are odd
	"02": misconfigured, // no data
	"03": misconfigured, // SQL statement not yet complete
	"08": transient,     // connection exception: lost or refused connection
	"09": misconfigured, // triggered action exception
	"0A": misconfigured, // feature not supported
	"0B": misconfigured, // invalid transaction initiation
	"0F": misconfigured, // locator exception
	"0L": misconfigured, // invalid grantor
	"0P": misconfigured, // invalid role specification
	"0Z": misconfigured, // diagnostics exception
	"20": misconfigured, // case not found
	"21": misconfigured, // cardinality violation
	"22": misconfigured, // data exception: a statement's value is malformed
	"23": misconfigured, // integrity constraint violation
	"24": misconfigured, // invalid cursor state
	"25": misconfigured, // invalid transaction state: statements manage transactions
	"26": misconfigured, // invalid SQL statement name
	"27": misconfigured, // triggered data change violation
	"28": misconfigured, // invalid authorization: the admin credential is refused
	"2B": unavailable,   // dependent privilege descriptors still exist: objects the role got meanwhile; retried later
	"2D": misconfigured, // invalid transaction termination
	"2F": misconfigured, // SQL routine exception
	"34": misconfigured, // invalid cursor name
	"38": misconfigured, // external routine exception
	"39": misconfigured, // external routine invocation exception
	"3B": misconfigured, // savepoint exception
	"3D": misconfigured, // invalid catalog name: no such database
	"3F": misconfigured, // invalid schema name
	"40": transient,     // transaction rollback: serialization failure, deadlock
	"42": misconfigured, // syntax error or access rule violation: the statements or the admin's rights
	"44": misconfigured, // WITH CHECK OPTION violation
	"53": transient,     // insufficient resources: too many connections, out of memory, disk full
	"54": misconfigured, // program limit exceeded
	"55": misconfigured, // object not in prerequisite state
	"57": transient,     // operator intervention: shutdown, restart, query cancelled
	"58": unavailable,   // system error: I/O error in the server
	"72": transient,     // snapshot failure
	"F0": misconfigured, // configuration file error
	"HV": misconfigured, // foreign data wrapper error
	"P0": misconfigured, // PL/pgSQL error: a statement raised
	"XX": unavailable,   // internal error
}

// sqlstateCodes are the codes that mean something else than their class.
var sqlstateCodes = map[string]disposition{
	"40003": unavailable,   // statement completion unknown: the outcome is unknown, so no blind retry
	"42710": unavailable,   // duplicate object: a role of this lease ID exists (an earlier try committed); the manager revokes it by ID
	"55006": transient,     // object in use
	"55P03": transient,     // lock not available
	"57014": transient,     // query cancelled (statement_timeout)
	"57P04": misconfigured, // database dropped
	"XX000": transient,     // internal error, as concurrent catalog updates raise it ("tuple concurrently updated")
}

// dispositionOf says what an error means, and whether it came with a
// SQLSTATE at all: an error without one means the server could not be
// reached or went away.
func dispositionOf(err error) disposition {
	code := sqlstate(err)
	if code == "" {
		var ce *pgconn.ConnectError
		if errors.As(err, &ce) || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
			// The server is down or unreachable: the lease manager's own
			// retries, not a busy loop here, wait for it.
			return unavailable
		}
		return transient // a connection lost under a statement
	}
	if d, ok := sqlstateCodes[code]; ok {
		return d
	}
	if d, ok := sqlstateClasses[code[:min(2, len(code))]]; ok {
		return d
	}
	return unavailable // a class PostgreSQL added after this table: never a final code
}

func sqlstate(err error) string {
	var pgErr *pgconn.PgError
	var sc *scrubbed
	switch {
	case errors.As(err, &pgErr):
		return pgErr.Code
	case errors.As(err, &sc):
		return sc.cause
	}
	return ""
}

// classify wraps err with the provider sentinel that says what the caller
// should do: retry later, or have the admin fix the configuration.
func classify(err error, what string) error {
	if decided(err) {
		return err
	}
	switch dispositionOf(err) {
	case misconfigured:
		return fmt.Errorf("%w: %s: %v", provider.ErrMisconfigured, what, err)
	default:
		return fmt.Errorf("%w: %s: %v", provider.ErrUnavailable, what, err)
	}
}

// retryable reports whether a failed attempt may be retried as it is:
// transient, and known not to have committed.
func retryable(err error, unknownOutcome bool) bool {
	return !unknownOutcome && !decided(err) && dispositionOf(err) == transient
}

// decided reports whether err is an answer rather than a failure: the
// role cannot be extended, or the request is refused (a quota, a role the
// driver did not make). Neither is retried nor reclassified.
func decided(err error) bool {
	return errors.Is(err, provider.ErrNotRenewable) || errors.Is(err, provider.ErrPermissionDenied)
}

// Backoff between attempts within one call.
const (
	retryFirst = 20 * time.Millisecond
	retryMax   = 500 * time.Millisecond
	// retryWithoutDeadline bounds the retries of a call whose context has
	// no deadline (the lease manager always sets one).
	retryWithoutDeadline = 5 * time.Second
)

// inTx runs fn in a transaction of its own. A failure of COMMIT that
// carries no server error leaves the outcome unknown.
func inTx(ctx context.Context, pool *pgxpool.Pool, fn func(pgx.Tx) error) (unknownOutcome bool, err error) {
	tx, err := pool.Begin(ctx)
	if err != nil {
		return false, err
	}
	if err := fn(tx); err != nil {
		_ = tx.Rollback(context.WithoutCancel(ctx))
		return false, err
	}
	if err := tx.Commit(ctx); err != nil {
		return sqlstate(err) == "", err
	}
	return false, nil
}

// withRetry runs attempt until it succeeds, fails for a reason a retry
// cannot help, or ctx ends (the lease manager bounds it by the backend
// timeout). attempt reports whether its failure left the outcome unknown
// (the connection went while COMMIT was in flight): that is never
// retried blindly.
func withRetry(ctx context.Context, what string, attempt func(ctx context.Context) (unknownOutcome bool, err error)) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, retryWithoutDeadline)
		defer cancel()
	}
	wait := retryFirst
	for {
		unknown, err := attempt(ctx)
		if err == nil {
			return nil
		}
		if !retryable(err, unknown) || ctx.Err() != nil {
			return classify(err, what)
		}
		t := time.NewTimer(wait/2 + rand.N(wait/2+1))
		select {
		case <-ctx.Done():
			t.Stop()
			return classify(err, what)
		case <-t.C:
		}
		wait = min(2*wait, retryMax)
	}
}
