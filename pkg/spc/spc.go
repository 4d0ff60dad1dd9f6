// Package spc resolves SecretProviderClasses and reads the pod identity
// kubelet passes in a volume's context.
package spc

import (
	"context"
	"errors"
)

// APIVersion and Kind of the SecretProviderClass documents we read; the same
// CRD secrets-store-csi-driver uses, so existing manifests carry over.
const (
	APIVersion = "secrets-store.csi.x-k8s.io/v1"
	Kind       = "SecretProviderClass"
)

// ErrClassNotFound means no class of that name exists in the pod's namespace.
var ErrClassNotFound = errors.New("SecretProviderClass not found")

// Class is the part of a SecretProviderClass the driver acts on.
type Class struct {
	Namespace  string
	Name       string
	Provider   string
	Parameters map[string]string
}

// Ref is "namespace/name", the form used in metadata and audit.
func (c *Class) Ref() string { return c.Namespace + "/" + c.Name }

// Resolver finds the SecretProviderClass a volume names. Implementations
// look only in the given namespace: a pod can use only its own namespace's
// classes.
type Resolver interface {
	Resolve(ctx context.Context, namespace, name string) (*Class, error)
}
