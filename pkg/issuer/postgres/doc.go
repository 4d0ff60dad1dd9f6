// Package postgres is the issuer's PostgreSQL engine: it holds the admin
// connections of a Config (pools), renders and runs the statements that
// create, extend and drop roles, tags every role it makes (COMMENT ON
// ROLE) and lists and reads the tagged ones, retries what a retry can
// help and classes every SQLSTATE (errors.go) into the provider's
// sentinels.
//
// It decides nothing about who may have what: the allowed lists, TTL
// bounds, maxLive quotas, pod checks, node binding and what to reap are
// pkg/issuer's, which calls this engine with its decisions (a role's
// expiry, an admission to run under the quota's lock, a re-check before a
// drop). What it does enforce is its own safety: it never touches a role
// without its tag, and quotes nothing into a statement that is not of a
// known safe form (CheckTag, CheckVerifier).
//
// It may import the standard library, pgx and pkg/provider (the error
// sentinels and Pod); never pkg/issuer, and never the node side
// (pkg/provider/postgres).
package postgres
