package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Finalizers: who must revoke the credential before its record goes.
const (
	// FinalizerRevoke is held by the issuer, for the engines it hosts
	// (PostgreSQL): it drops the role, then removes the finalizer.
	FinalizerRevoke = "ephemeral-secrets.csi.dev/revoke"
	// FinalizerNodeRevoke is held by the node plugin of spec.node, for the
	// providers whose revocation the node does itself (Vault, AWS).
	FinalizerNodeRevoke = "ephemeral-secrets.csi.dev/node-revoke"
)

// Labels every Credential carries, so that a node, a provider or a pod's
// records can be selected.
const (
	LabelNode     = "ephemeral-secrets.csi.dev/node"
	LabelProvider = "ephemeral-secrets.csi.dev/provider"
	LabelPodUID   = "ephemeral-secrets.csi.dev/pod-uid"
	LabelLeaseID  = "ephemeral-secrets.csi.dev/lease-id"
)

// State is where a credential is in its life.
// +kubebuilder:validation:Enum=Issuing;Issued;Revoking;Revoked
type State string

// The states of a credential.
const (
	// StateIssuing: recorded before the backend was asked; the credential
	// may or may not exist yet.
	StateIssuing State = "Issuing"
	// StateIssued: the backend holds it until status.expiresAt.
	StateIssued State = "Issued"
	// StateRevoking: the record is being deleted and the credential is
	// being revoked (a failure is in the Revoked condition).
	StateRevoking State = "Revoking"
	// StateRevoked: the backend confirmed it is gone.
	StateRevoked State = "Revoked"
)

// Condition types of status.conditions.
const (
	// ConditionIssued is True while the backend holds the credential.
	ConditionIssued = "Issued"
	// ConditionRevoked is True once the credential is revoked, False with
	// the reason while a revocation is pending or failing.
	ConditionRevoked = "Revoked"
)

// Credential is the record of one live credential: which pod on which
// node holds what, from which backend, until when. It never holds a
// secret. Deleting it revokes the credential.
//
// +genclient
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:scope=Namespaced,shortName=cred;creds,categories=ephemeral-secrets
// +kubebuilder:printcolumn:name="Pod",type=string,JSONPath=`.spec.pod.name`
// +kubebuilder:printcolumn:name="Node",type=string,JSONPath=`.spec.node`
// +kubebuilder:printcolumn:name="Provider",type=string,JSONPath=`.spec.provider`
// +kubebuilder:printcolumn:name="Role",type=string,JSONPath=`.spec.role`
// +kubebuilder:printcolumn:name="State",type=string,JSONPath=`.status.state`
// +kubebuilder:printcolumn:name="Expires",type=string,format=date-time,JSONPath=`.status.expiresAt`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
// +kubebuilder:printcolumn:name="Class",type=string,JSONPath=`.spec.class`,priority=1
// +kubebuilder:printcolumn:name="Lease",type=string,JSONPath=`.spec.leaseID`,priority=1
type Credential struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// +required
	Spec CredentialSpec `json:"spec"`
	// +optional
	Status CredentialStatus `json:"status,omitzero"`
}

// CredentialSpec says what was issued to whom. It cannot be changed once
// written: a record says what happened.
//
// +kubebuilder:validation:XValidation:rule="self == oldSelf",message="spec is immutable"
type CredentialSpec struct {
	// Pod is the pod the credential was issued for (the object's owner).
	// +required
	Pod PodReference `json:"pod"`
	// Node is the node the pod runs on, whose plugin holds the credential.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	// +required
	Node string `json:"node"`
	// Class is the SecretProviderClass, "namespace/name".
	// +kubebuilder:validation:MaxLength=317
	// +required
	Class string `json:"class"`
	// Provider is the backend: postgres, vault, aws.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=63
	// +required
	Provider string `json:"provider"`
	// Role is what the credential is for, as the provider names it
	// (postgres: "connection/role").
	// +kubebuilder:validation:MaxLength=512
	// +optional
	Role string `json:"role,omitempty"`
	// LeaseID is the driver's ID of the credential ([a-z0-9-]): the handle
	// in audit records, node state and the backend's tag.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=63
	// +kubebuilder:validation:Pattern=`^[a-z0-9]([a-z0-9-]*[a-z0-9])?$`
	// +required
	LeaseID string `json:"leaseID"`
	// VolumeID is the CSI volume that holds the credential's files.
	// +kubebuilder:validation:MaxLength=256
	// +optional
	VolumeID string `json:"volumeID,omitempty"`
}

// PodReference names a pod in the Credential's namespace.
type PodReference struct {
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	// +required
	Name string `json:"name"`
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=128
	// +required
	UID string `json:"uid"`
	// +kubebuilder:validation:MaxLength=253
	// +optional
	ServiceAccount string `json:"serviceAccount,omitempty"`
}

// CredentialStatus is what became of the credential.
type CredentialStatus struct {
	// +optional
	State State `json:"state,omitempty"`
	// BackendName is the name the backend knows the credential by (the
	// database role), when it has one. Not a secret.
	// +kubebuilder:validation:MaxLength=253
	// +optional
	BackendName string `json:"backendName,omitempty"`
	// +optional
	IssuedAt *metav1.Time `json:"issuedAt,omitempty"`
	// ExpiresAt is when the backend ends the credential unless it is
	// renewed.
	// +optional
	ExpiresAt *metav1.Time `json:"expiresAt,omitempty"`
	// +listType=map
	// +listMapKey=type
	// +optional
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// CredentialList is a list of Credentials.
//
// +kubebuilder:object:root=true
type CredentialList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []Credential `json:"items"`
}
