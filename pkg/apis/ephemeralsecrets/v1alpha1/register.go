package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// GroupName is the API group of the inventory (the driver's name).
const GroupName = "ephemeral-secrets.csi.dev"

// SchemeGroupVersion is the group and version of these types.
var SchemeGroupVersion = schema.GroupVersion{Group: GroupName, Version: "v1alpha1"}

// Resource is the plural resource name of Credential.
const Resource = "credentials"

// AddToScheme adds the types of this version to a scheme.
func AddToScheme(s *runtime.Scheme) error {
	s.AddKnownTypes(SchemeGroupVersion, &Credential{}, &CredentialList{})
	metav1.AddToGroupVersion(s, SchemeGroupVersion)
	return nil
}
