package postgres

import (
	"fmt"
	"regexp"
	"strings"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// tagPrefix starts the comment of every role the driver creates
// (COMMENT ON ROLE, in the creating transaction). A role without it was
// not made by the driver and is never extended, dropped or reaped.
const tagPrefix = "ephemeral-secrets-csi v1 "

// Tag is the non-secret record a role carries as its comment: which lease
// and pod it is for and when it was made. It is the database's own
// inventory of what the driver created.
type Tag struct {
	LeaseID string
	// Role is "connection/role" of the admin's configuration.
	Role  string
	Class string
	Pod   provider.Pod
	// Node is the node whose plugin asked for the role; empty when the
	// driver's own process asked (no cluster).
	Node string
	// Volume is the CSI volume the role is for (absent from roles tagged
	// before it was recorded).
	Volume  string
	Created time.Time
}

// String is the comment: space-separated key=value fields, each value of
// a character set checked before the role is made (Check), so it
// needs no quoting.
func (t Tag) String() string {
	return fmt.Sprintf("%slease=%s role=%s class=%s ns=%s pod=%s uid=%s sa=%s node=%s vol=%s created=%s", tagPrefix,
		t.LeaseID, t.Role, t.Class, t.Pod.Namespace, t.Pod.Name, t.Pod.UID, t.Pod.ServiceAccount, t.Node,
		t.Volume, t.Created.UTC().Format(time.RFC3339))
}

// parseTag reads a role's comment; ok is false for a comment the driver
// did not write.
func parseTag(comment string) (Tag, bool) {
	rest, ok := strings.CutPrefix(comment, tagPrefix)
	if !ok {
		return Tag{}, false
	}
	var t Tag
	for _, f := range strings.Fields(rest) {
		k, v, _ := strings.Cut(f, "=")
		switch k {
		case "lease":
			t.LeaseID = v
		case "role":
			t.Role = v
		case "class":
			t.Class = v
		case "ns":
			t.Pod.Namespace = v
		case "pod":
			t.Pod.Name = v
		case "uid":
			t.Pod.UID = v
		case "sa":
			t.Pod.ServiceAccount = v
		case "node":
			t.Node = v
		case "vol":
			t.Volume = v
		case "created":
			t.Created, _ = time.Parse(time.RFC3339, v)
		}
	}
	if t.LeaseID == "" || t.Created.IsZero() {
		return Tag{}, false
	}
	return t, true
}

var (
	leaseIDPattern = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,252}$`)
	// What Kubernetes names (namespaces, pods, service accounts, a
	// class's "namespace/name") and UIDs are made of.
	namePattern = regexp.MustCompile(`^[a-zA-Z0-9._:/-]{0,253}$`)
	// What the admin's connection and role names may be made of.
	configKeyPattern = regexp.MustCompile(`^[A-Za-z0-9._-]{1,63}$`)
)

// Check refuses a tag whose fields could not be recorded as they are: a
// lease ID or a pod identity of unexpected characters comes from a caller
// that does not follow the protocol (ErrInvalidParameters).
func (t Tag) Check() error {
	if !leaseIDPattern.MatchString(t.LeaseID) {
		return fmt.Errorf("%w: lease ID must be of [a-z0-9-]", provider.ErrInvalidParameters)
	}
	for _, v := range []string{t.Class, t.Node, t.Volume, t.Pod.Namespace, t.Pod.Name, t.Pod.UID, t.Pod.ServiceAccount} {
		if !namePattern.MatchString(v) {
			return fmt.Errorf("%w: pod identity, volume or class of unexpected characters", provider.ErrInvalidParameters)
		}
	}
	return nil
}

// verifierPattern is the form of a SCRAM-SHA-256 verifier: it goes into
// a statement between quotes, so nothing else is taken.
var verifierPattern = regexp.MustCompile(`^SCRAM-SHA-256\$[0-9]{1,7}:[A-Za-z0-9+/=]{1,200}\$[A-Za-z0-9+/=]{1,200}:[A-Za-z0-9+/=]{1,200}$`)

// CheckVerifier refuses a verifier that is not of a SCRAM-SHA-256
// verifier's form (ErrInvalidParameters).
func CheckVerifier(v string) error {
	if !verifierPattern.MatchString(v) {
		return fmt.Errorf("%w: verifier is not a SCRAM-SHA-256 verifier", provider.ErrInvalidParameters)
	}
	return nil
}
