package record

import (
	"strings"

	v1alpha1 "github.com/ephemeral-secrets/csi-driver/pkg/apis/ephemeralsecrets/v1alpha1"
)

// IsTombstone tells whether c is a tombstone rather than the record of a
// credential: by its name too, so that a tombstone just created, whose
// status is not written yet, is never taken for the record it copies (a
// drop of that lease deleted it; found by the real-cluster suite).
func IsTombstone(c *v1alpha1.Credential) bool {
	return c.Status.State == v1alpha1.StateWithdrawn || strings.HasPrefix(c.Name, v1alpha1.TombstonePrefix)
}
