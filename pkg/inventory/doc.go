// Package inventory keeps the cluster's record of live credentials: one
// Credential object (pkg/apis/ephemeralsecrets/v1alpha1) per credential,
// in the pod's namespace, owned by the Pod, never holding a secret.
//
// Who writes what:
//   - the issuer records the credentials of the engines it hosts through a
//     Recorder (issuer.Inventory) and holds their finalizer
//     (FinalizerRevoke); its Controller revokes a credential whose record
//     is being deleted (the Pod's deletion through the garbage collector,
//     or an admin's kubectl delete: the kill switch) and then lets the
//     record go;
//   - a node plugin records the credentials it revokes itself (Vault, AWS)
//     through a NodeRecorder, which holds FinalizerNodeRevoke, and its
//     NodeWatcher tells it when a record of its node is being deleted, so
//     that it empties the volume (and revokes what it holds).
package inventory
