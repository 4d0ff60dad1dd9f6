package spc

import (
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// Volume attribute keys. The csi.storage.k8s.io/* keys are set by kubelet
// (CSIDriver podInfoOnMount and tokenRequests); a pod may set only ClassKey.
const (
	ClassKey          = "secretProviderClass"
	PodNameKey        = "csi.storage.k8s.io/pod.name"
	PodNamespaceKey   = "csi.storage.k8s.io/pod.namespace"
	PodUIDKey         = "csi.storage.k8s.io/pod.uid"
	ServiceAccountKey = "csi.storage.k8s.io/serviceAccount.name"
	EphemeralKey      = "csi.storage.k8s.io/ephemeral"
	TokensKey         = "csi.storage.k8s.io/serviceAccount.tokens"

	kubeletPrefix = "csi.storage.k8s.io/"
)

// ErrInvalidContext means the volume context is malformed or asks for
// something a pod may not ask for.
var ErrInvalidContext = errors.New("invalid volume context")

var kubeletKeys = map[string]bool{
	PodNameKey: true, PodNamespaceKey: true, PodUIDKey: true,
	ServiceAccountKey: true, EphemeralKey: true, TokensKey: true,
}

// TokenSource is where kubelet puts the pod's service-account tokens (the
// CSIDriver's tokenRequests): in the request's secrets when the CSIDriver
// sets serviceAccountTokenInSecrets (as deploy/ does), else in the volume
// context. Kubelet overwrites the key in that one place only; the same key
// in the other place came from the pod (its volumeAttributes, or a Secret
// its nodePublishSecretRef names) and is refused: a pod cannot choose the
// token the driver presents.
type TokenSource int

// Token sources.
const (
	TokensFromSecrets TokenSource = iota
	TokensFromVolumeContext
)

// Mount is what a volume context asks for, parsed and checked.
type Mount struct {
	Class  string
	Pod    provider.Pod
	Tokens map[string]provider.Token
}

// ParseVolumeContext reads the pod identity and class name from a
// NodePublishVolume volume_context, and the service-account tokens from
// where src says kubelet puts them. Errors wrap ErrInvalidContext and
// never quote a token.
func ParseVolumeContext(vc, secrets map[string]string, src TokenSource) (Mount, error) {
	var m Mount
	keys := make([]string, 0, len(vc))
	for k := range vc {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		switch {
		case kubeletKeys[k], k == ClassKey:
		case strings.HasPrefix(k, kubeletPrefix):
			return m, fmt.Errorf("%w: attribute %q is reserved for kubelet", ErrInvalidContext, k)
		default:
			return m, fmt.Errorf("%w: unknown attribute %q (a pod may set only %q; everything else belongs in the SecretProviderClass)", ErrInvalidContext, k, ClassKey)
		}
	}
	m.Class = vc[ClassKey]
	m.Pod = provider.Pod{
		Namespace:      vc[PodNamespaceKey],
		Name:           vc[PodNameKey],
		UID:            vc[PodUIDKey],
		ServiceAccount: vc[ServiceAccountKey],
	}
	for _, f := range []struct{ key, val string }{
		{ClassKey, m.Class}, {PodNamespaceKey, m.Pod.Namespace}, {PodNameKey, m.Pod.Name},
		{ServiceAccountKey, m.Pod.ServiceAccount},
	} {
		if f.val == "" {
			return m, fmt.Errorf("%w: %q is missing (is podInfoOnMount set on the CSIDriver?)", ErrInvalidContext, f.key)
		}
		if err := ValidateObjectName(f.val); err != nil {
			return m, fmt.Errorf("%w: %q: %v", ErrInvalidContext, f.key, err)
		}
	}
	if !isUID(m.Pod.UID) {
		return m, fmt.Errorf("%w: %q is missing or not a UID", ErrInvalidContext, PodUIDKey)
	}
	if e, ok := vc[EphemeralKey]; ok && e != "true" && e != "false" {
		return m, fmt.Errorf("%w: %q must be true or false", ErrInvalidContext, EphemeralKey)
	}
	raw, forged := secrets[TokensKey], vc
	where := "volume attributes (kubelet passes them in the request's secrets: serviceAccountTokenInSecrets)"
	if src == TokensFromVolumeContext {
		raw, forged = vc[TokensKey], secrets
		where = "a nodePublishSecretRef Secret (kubelet passes them in the volume context)"
	}
	if _, ok := forged[TokensKey]; ok {
		return m, fmt.Errorf("%w: %q set in %s: a pod cannot supply its own service-account token", ErrInvalidContext, TokensKey, where)
	}
	if raw != "" {
		if err := json.Unmarshal([]byte(raw), &m.Tokens); err != nil {
			// json errors can quote the input; never pass them on.
			return m, fmt.Errorf("%w: %q is not a JSON map of audience to token", ErrInvalidContext, TokensKey)
		}
	}
	return m, nil
}

// isUID reports whether s is a UID as Kubernetes writes them
// (8-4-4-4-12 hexadecimal digits).
func isUID(s string) bool {
	if len(s) != 36 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch i {
		case 8, 13, 18, 23:
			if c != '-' {
				return false
			}
		default:
			if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F') {
				return false
			}
		}
	}
	return true
}

// ValidateObjectName checks a Kubernetes object name (DNS subdomain:
// lower-case alphanumerics, '-' and '.', alphanumeric at both ends).
func ValidateObjectName(s string) error {
	ok := len(s) > 0 && len(s) <= 253
	for i := 0; ok && i < len(s); i++ {
		c := s[i]
		alnum := c >= 'a' && c <= 'z' || c >= '0' && c <= '9'
		ok = alnum || (c == '-' || c == '.') && i > 0 && i < len(s)-1
	}
	if !ok {
		return fmt.Errorf("%q is not a valid object name", truncate(s, 64))
	}
	return nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}
