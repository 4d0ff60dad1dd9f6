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

// State is where a credential is in its life; none on a record created
// before its backend was asked, until its status is written.
// +kubebuilder:validation:Enum=Issued;Revoking;Revoked;Withdrawn
type State string

// The states of a credential. (Issuing, the state of a record written
// before its backend was asked, went with the issuer's one-write mint: no
// release wrote it, so no stored object has it and the enum could narrow.)
const (
	// StateIssued: the backend holds it until status.expiresAt.
	StateIssued State = "Issued"
	// StateRevoking: the record is being deleted and the credential is
	// being revoked (a failure is in the Revoked condition).
	StateRevoking State = "Revoking"
	// StateRevoked: the backend confirmed it is gone.
	StateRevoked State = "Revoked"
	// StateWithdrawn marks a tombstone, not a credential: the record of a
	// live pod's credential was deleted (the kill switch), so its volume
	// is never issued a credential again while the pod lives. The issuer
	// alone writes one (named TombstonePrefix + a digest of the pod UID
	// and volume ID, owned by the Pod, without a finalizer); the garbage
	// collector deletes it with the pod, and an admin who deletes it lets
	// the volume be issued again.
	StateWithdrawn State = "Withdrawn"
)

// TombstonePrefix begins the name of every tombstone (StateWithdrawn).
const TombstonePrefix = "withdrawn."

// Condition types of status.conditions.
const (
	// ConditionIssued is True while the backend holds the credential.
	ConditionIssued = "Issued"
	// ConditionRevoked is True once the credential is revoked, False with
	// the reason while a revocation is pending or failing.
	ConditionRevoked = "Revoked"
	// ConditionWithdrawn is True on a tombstone; its message says which
	// record's deletion withdrew the volume's credential, and when.
	ConditionWithdrawn = "Withdrawn"
	// ConditionUsed is True once the issuer saw a session of the
	// credential; False while it saw none, with the reason NeverUsed, or
	// NotObserved when the issuer did not see all of its life (it cannot
	// see sessions, or started after the credential): never used then
	// means not known.
	ConditionUsed = "Used"
)

// Reasons of the Used condition.
const (
	ReasonUsed        = "Used"
	ReasonNeverUsed   = "NeverUsed"
	ReasonNotObserved = "NotObserved"
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
// +kubebuilder:printcolumn:name="Last-Used",type=date,JSONPath=`.status.lastUsedAt`
// +kubebuilder:printcolumn:name="Sources",type=string,JSONPath=`.status.sourcesSummary`
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

	// The credential's use, as the issuer saw it in the backend (the
	// sessions its PostgreSQL role opened): written on its first use, on a
	// new source, at most once a minute for lastUsedAt, and at its
	// revocation. The Used condition says whether it was used, or that the
	// issuer could not see.

	// FirstUsedAt is when a session of the credential was first seen.
	// +optional
	FirstUsedAt *metav1.Time `json:"firstUsedAt,omitempty"`
	// LastUsedAt is when a session of it was last seen (to the minute).
	// +optional
	LastUsedAt *metav1.Time `json:"lastUsedAt,omitempty"`
	// Sources are the client addresses its sessions came from, in the
	// order first seen (the first ones only: droppedSources counts the
	// rest).
	// +kubebuilder:validation:MaxItems=8
	// +listType=atomic
	// +optional
	Sources []Source `json:"sources,omitempty"`
	// SourcesSummary is sources in one line, for kubectl get: the first
	// addresses, each foreign one marked "(foreign)", and how many more.
	// +kubebuilder:validation:MaxLength=256
	// +optional
	SourcesSummary string `json:"sourcesSummary,omitempty"`
	// DroppedSources counts the source addresses left out of sources.
	// +kubebuilder:validation:Minimum=0
	// +optional
	DroppedSources int32 `json:"droppedSources,omitempty"`
	// Sessions is the most sessions of the credential seen open at once.
	// +kubebuilder:validation:Minimum=0
	// +optional
	Sessions int32 `json:"sessions,omitempty"`
}

// Source is one client address a credential was used from.
type Source struct {
	// Address is the client's IP address (no port).
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=64
	// +required
	Address string `json:"address"`
	// FirstSeen is when a session from it was first seen.
	// +required
	FirstSeen metav1.Time `json:"firstSeen"`
	// Foreign is true when the address is none the issuer expected for the
	// credential (its pod's IPs, its node's addresses, the networks the
	// admin listed for the connection): the credential was used elsewhere.
	// +optional
	Foreign bool `json:"foreign,omitempty"`
}

// CredentialList is a list of Credentials.
//
// +kubebuilder:object:root=true
type CredentialList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []Credential `json:"items"`
}
