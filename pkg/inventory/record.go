package inventory

import (
	"context"

	"k8s.io/client-go/tools/cache"

	v1alpha1 "github.com/ephemeral-secrets/csi-driver/pkg/apis/ephemeralsecrets/v1alpha1"
	"github.com/ephemeral-secrets/csi-driver/pkg/credential"
	"github.com/ephemeral-secrets/csi-driver/pkg/inventory/record"
)

// The records themselves (their client, their writes, the node plugin's
// recorder and watcher) live in package record, which the node plugin
// links without the issuer and the typed clients this package needs;
// these are their names here.
type (
	// Client reads and writes Credentials (record.Client).
	Client = record.Client
	// NodeRecorder records the credentials a node plugin revokes itself.
	NodeRecorder = record.NodeRecorder
	// NodeWatcher withdraws the volumes of the node's deleted records.
	NodeWatcher = record.NodeWatcher
	// WithdrawFunc withdraws a volume whose record is deleted.
	WithdrawFunc = record.WithdrawFunc
	// HoldsFunc tells whether the node still holds a lease.
	HoldsFunc = record.HoldsFunc
)

var (
	// NewClient returns a Client of the API server cfg names.
	NewClient = record.NewClient
	// NewInformer is a shared informer of the Credentials a selector
	// matches.
	NewInformer = record.NewInformer
	// NewNodeRecorder records through a Client.
	NewNodeRecorder = record.NewNodeRecorder
	// NewNodeWatcher watches a node's records.
	NewNodeWatcher = record.NewNodeWatcher
	// Name is the name of the Credential of a lease.
	Name = record.Name

	labelValue = record.LabelValue
	// leaseIndex indexes a cache of Credentials by spec.leaseID.
	leaseIndex = record.LeaseIndex
	podOwner   = record.PodOwner
	entry      = record.RecordOf
	issued     = record.Issued
)

// store writes records held by one finalizer (record.Store).
type store struct {
	client    *Client
	finalizer string
	// cache, when it has synced, gives the first read of a write.
	cache cache.SharedIndexInformer
	// created, when set, keeps the records this store created until
	// their first change, which then needs no read even before the
	// cache has them.
	created *record.Created
}

func (s store) record() record.Store {
	return record.Store{Client: s.client, Finalizer: s.finalizer, Cache: s.cache, Created: s.created}
}

func (s store) create(ctx context.Context, e credential.Record) (*v1alpha1.Credential, bool, error) {
	return s.record().Create(ctx, e)
}

func (s store) setStatus(ctx context.Context, e credential.Record, change func(*v1alpha1.CredentialStatus)) error {
	return s.record().SetStatus(ctx, e, change)
}

func (s store) updateStatus(ctx context.Context, namespace, name string, change func(*v1alpha1.Credential) error) error {
	return s.record().UpdateStatus(ctx, namespace, name, change)
}

func (s store) release(ctx context.Context, namespace, name string) error {
	return s.record().Release(ctx, namespace, name)
}
