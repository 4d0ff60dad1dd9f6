package lease

// For the external tests (package lease_test), which may import the test
// servers that import this package.
var NeedPostgres = needPostgres

type ClassMap = classMap

type AuditTrail = auditTrail
