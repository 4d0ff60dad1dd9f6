// Package spc resolves SecretProviderClasses and reads the pod identity
// kubelet passes in a volume's context.
//
// It imports pkg/provider (the pod identity) only.
package spc

import (
	"context"
	"errors"
	"fmt"
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

	// refusal, when set, is why the class cannot be used (a classes file
	// keeps its other classes usable).
	refusal error
}

// refuseSecretObjects is the error for a class that asks for
// secrets-store-csi-driver's sync to a Kubernetes Secret.
func refuseSecretObjects(namespace, name string) error {
	return fmt.Errorf("%w: class %s/%s sets spec.secretObjects, which this driver refuses: it never writes "+
		"Kubernetes Secrets, since a credential copied into a Secret is stored in etcd and outlives the pod it "+
		"was issued for; remove secretObjects and read the files of the volume instead",
		ErrInvalidContext, namespace, name)
}

// Ref is "namespace/name", the form used in metadata and audit.
func (c *Class) Ref() string { return c.Namespace + "/" + c.Name }

// Resolver finds the SecretProviderClass a volume names. Implementations
// look only in the given namespace: a pod can use only its own namespace's
// classes.
type Resolver interface {
	Resolve(ctx context.Context, namespace, name string) (*Class, error)
}
