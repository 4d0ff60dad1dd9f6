package postgres

// ScramVerifier is scramVerifier, for the tests of package postgres_test
// (which run the node side against a real issuer).
var ScramVerifier = scramVerifier
