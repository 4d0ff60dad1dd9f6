package record

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/retry"

	v1alpha1 "github.com/ephemeral-secrets/csi-driver/pkg/apis/ephemeralsecrets/v1alpha1"
	"github.com/ephemeral-secrets/csi-driver/pkg/credential"
)

// Name is the name of the Credential of a lease: the lease ID itself
// when it is a valid object name (the driver's are), else a digest of it.
func Name(leaseID string) string {
	if len(validation.IsDNS1123Subdomain(leaseID)) == 0 && len(leaseID) <= 63 {
		return leaseID
	}
	sum := sha256.Sum256([]byte(leaseID))
	return "lease-" + hex.EncodeToString(sum[:16])
}

// newCredential is the Credential object of e, held by finalizer.
func newCredential(e credential.Record, finalizer string) (*v1alpha1.Credential, error) {
	switch {
	case e.LeaseID == "":
		return nil, errors.New("inventory: entry without a lease ID")
	case e.Pod.Namespace == "" || e.Pod.Name == "" || e.Pod.UID == "":
		return nil, fmt.Errorf("inventory: lease %s: entry without the pod's namespace, name and UID", e.LeaseID)
	case e.Node == "":
		return nil, fmt.Errorf("inventory: lease %s: entry without a node", e.LeaseID)
	}
	return &v1alpha1.Credential{
		ObjectMeta: metav1.ObjectMeta{
			Name:      Name(e.LeaseID),
			Namespace: e.Pod.Namespace,
			Labels: map[string]string{
				v1alpha1.LabelNode:     LabelValue(e.Node),
				v1alpha1.LabelProvider: LabelValue(e.Provider),
				v1alpha1.LabelPodUID:   LabelValue(e.Pod.UID),
				v1alpha1.LabelLeaseID:  LabelValue(e.LeaseID),
			},
			OwnerReferences: []metav1.OwnerReference{PodOwner(v1alpha1.PodReference{Name: e.Pod.Name, UID: e.Pod.UID})},
			Finalizers:      []string{finalizer},
		},
		Spec: v1alpha1.CredentialSpec{
			Pod:      v1alpha1.PodReference{Name: e.Pod.Name, UID: e.Pod.UID, ServiceAccount: e.Pod.ServiceAccount},
			Node:     e.Node,
			Class:    e.Class,
			Provider: e.Provider,
			Role:     e.Role,
			LeaseID:  e.LeaseID,
			VolumeID: e.VolumeID,
		},
	}, nil
}

// PodOwner is the owner reference of a record to its Pod. No
// blockOwnerDeletion: the Pod's deletion must not wait for a revocation
// (nor need the right to set it).
func PodOwner(pod v1alpha1.PodReference) metav1.OwnerReference {
	return metav1.OwnerReference{APIVersion: "v1", Kind: "Pod", Name: pod.Name, UID: types.UID(pod.UID)}
}

// LabelValue is v where it is a valid label value; else a digest of it,
// so that a selector on the exact value still finds it.
func LabelValue(v string) string {
	if len(validation.IsValidLabelValue(v)) == 0 {
		return v
	}
	sum := sha256.Sum256([]byte(v))
	return "sha256-" + hex.EncodeToString(sum[:20])
}

// RecordOf is the credential record c holds: the one conversion from the
// Kubernetes shape (newCredential and Issued are the ones to it).
func RecordOf(c *v1alpha1.Credential) credential.Record {
	e := credential.Record{
		LeaseID: c.Spec.LeaseID, VolumeID: c.Spec.VolumeID, Node: c.Spec.Node,
		Class: c.Spec.Class, Provider: c.Spec.Provider, Role: c.Spec.Role, Name: c.Status.BackendName,
	}
	e.Pod.Namespace, e.Pod.Name, e.Pod.UID, e.Pod.ServiceAccount = c.Namespace, c.Spec.Pod.Name, c.Spec.Pod.UID, c.Spec.Pod.ServiceAccount
	if c.Status.IssuedAt != nil {
		e.IssuedAt = c.Status.IssuedAt.Time
	}
	if c.Status.ExpiresAt != nil {
		e.ExpiresAt = c.Status.ExpiresAt.Time
	}
	return e
}

// Store writes records held by one finalizer.
type Store struct {
	Client    *Client
	Finalizer string
	// Cache, when it has synced, gives the first read of a write (a
	// conflict makes the retries read the API server).
	Cache cache.SharedIndexInformer
	// Created, when set, keeps the records this store created until
	// their first change, which then needs no read even before the
	// cache has them.
	Created *Created
}

// Read returns a record to change: on a first attempt from the cache, or
// as this store created it; else (and on every retry) from the API
// server. A record read from either but changed since makes the write
// conflict, and the retry reads it fresh.
func (s Store) Read(ctx context.Context, namespace, name string, first bool) (*v1alpha1.Credential, error) {
	if !first {
		return s.Client.Get(ctx, namespace, name)
	}
	key := namespace + "/" + name
	mine := s.Created.take(key)
	if s.Cache != nil && s.Cache.HasSynced() {
		obj, ok, err := s.Cache.GetIndexer().GetByKey(key)
		if c, isCred := obj.(*v1alpha1.Credential); err == nil && ok && isCred {
			return c.DeepCopy(), nil
		}
	}
	if mine != nil {
		return mine, nil
	}
	return s.Client.Get(ctx, namespace, name)
}

// Created is the records a store created and has not changed since, by
// namespace/name, up to a bound.
type Created struct {
	mu sync.Mutex
	m  map[string]*v1alpha1.Credential
}

// maxCreated bounds Created: past it, a first change reads the record.
const maxCreated = 10000

// NewCreated returns an empty Created.
func NewCreated() *Created { return &Created{m: map[string]*v1alpha1.Credential{}} }

func (c *Created) put(obj *v1alpha1.Credential) {
	if c == nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.m) < maxCreated {
		c.m[obj.Namespace+"/"+obj.Name] = obj
	}
}

// take returns and forgets the record of key (nil if none).
func (c *Created) take(key string) *v1alpha1.Credential {
	if c == nil {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	obj := c.m[key]
	delete(c.m, key)
	return obj
}

// Create records e; made tells whether this call created it. A record of
// the same lease that exists already (a retry) is no error.
func (s Store) Create(ctx context.Context, e credential.Record) (out *v1alpha1.Credential, made bool, err error) {
	c, err := newCredential(e, s.Finalizer)
	if err != nil {
		return nil, false, err
	}
	out, err = s.Client.Create(ctx, c)
	if err == nil {
		s.Created.put(out.DeepCopy())
	}
	if apierrors.IsAlreadyExists(err) {
		if out, err = s.Client.Get(ctx, c.Namespace, c.Name); err != nil {
			return nil, false, fmt.Errorf("inventory: lease %s: %w", e.LeaseID, err)
		}
		if out.Spec.LeaseID != e.LeaseID || out.Spec.Pod.UID != e.Pod.UID {
			return nil, false, fmt.Errorf("inventory: lease %s: the name %s/%s records lease %s", e.LeaseID, c.Namespace, c.Name, out.Spec.LeaseID)
		}
		if out.DeletionTimestamp != nil {
			return nil, false, fmt.Errorf("inventory: lease %s: %w", e.LeaseID, credential.ErrRecordGone)
		}
		return out, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("inventory: recording lease %s: %w", e.LeaseID, err)
	}
	return out, true, nil
}

// SetStatus applies change to the status of e's record (read fresh,
// retried on conflict). A record that is gone or being deleted is credential.ErrRecordGone.
func (s Store) SetStatus(ctx context.Context, e credential.Record, change func(*v1alpha1.CredentialStatus)) error {
	err := s.UpdateStatus(ctx, e.Pod.Namespace, Name(e.LeaseID), func(c *v1alpha1.Credential) error {
		if c.DeletionTimestamp != nil || c.Spec.LeaseID != e.LeaseID {
			return credential.ErrRecordGone
		}
		change(&c.Status)
		return nil
	})
	if apierrors.IsNotFound(err) {
		err = credential.ErrRecordGone
	}
	if err != nil {
		return fmt.Errorf("inventory: lease %s: %w", e.LeaseID, err)
	}
	return nil
}

// UpdateStatus applies change to a record read fresh and writes its
// status, retried on conflict.
func (s Store) UpdateStatus(ctx context.Context, namespace, name string, change func(*v1alpha1.Credential) error) error {
	first := true
	return retry.RetryOnConflict(retry.DefaultRetry, func() error {
		c, err := s.Read(ctx, namespace, name, first)
		first = false
		if err != nil {
			return err
		}
		if err := change(c); err != nil {
			return err
		}
		_, err = s.Client.UpdateStatus(ctx, c)
		return err
	})
}

// Issued is the status of a credential the backend holds.
func Issued(e credential.Record) func(*v1alpha1.CredentialStatus) {
	return func(st *v1alpha1.CredentialStatus) {
		st.State = v1alpha1.StateIssued
		if e.Name != "" {
			st.BackendName = e.Name
		}
		if !e.IssuedAt.IsZero() && st.IssuedAt == nil {
			st.IssuedAt = &metav1.Time{Time: e.IssuedAt}
		}
		msg := "the backend holds the credential"
		if !e.ExpiresAt.IsZero() {
			st.ExpiresAt = &metav1.Time{Time: e.ExpiresAt}
			msg += " until " + e.ExpiresAt.UTC().Format(time.RFC3339)
		}
		meta.SetStatusCondition(&st.Conditions, metav1.Condition{
			Type: v1alpha1.ConditionIssued, Status: metav1.ConditionTrue, Reason: "Issued", Message: msg,
		})
	}
}

// Release removes the store's finalizer from the record and deletes it
// (one being deleted already goes once its finalizers are gone): the
// record goes, unless another finalizer holds it. Gone is no error.
func (s Store) Release(ctx context.Context, namespace, name string) error {
	deleting, first := false, true
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		c, err := s.Read(ctx, namespace, name, first)
		first = false
		if err != nil {
			return err
		}
		deleting = c.DeletionTimestamp != nil
		if !slices.Contains(c.Finalizers, s.Finalizer) {
			return nil
		}
		c.Finalizers = slices.DeleteFunc(c.Finalizers, func(f string) bool { return f == s.Finalizer })
		_, err = s.Client.Update(ctx, c)
		return err
	})
	if err == nil && !deleting {
		err = s.Client.Delete(ctx, namespace, name, metav1.DeleteOptions{})
	}
	if err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("inventory: releasing %s/%s: %w", namespace, name, err)
	}
	return nil
}
