// Package inventory keeps the cluster's record of live credentials: one
// Credential object (pkg/apis/ephemeralsecrets/v1alpha1) per credential,
// in the pod's namespace, owned by the Pod, never holding a secret.
//
// Who writes what:
//   - the issuer records the credentials of the engines it hosts through a
//     Recorder (the issuer's Inventory, of pkg/credential records) and holds their finalizer
//     (FinalizerRevoke); its Controller revokes a credential whose record
//     is being deleted (the Pod's deletion through the garbage collector,
//     or an admin's kubectl delete: the kill switch) and then lets the
//     record go; a kill while the pod lives leaves a tombstone
//     (tombstone.go) that refuses the volume a new credential;
//   - a node plugin records the credentials it revokes itself (Vault, AWS)
//     through a NodeRecorder, which holds FinalizerNodeRevoke, and its
//     NodeWatcher tells it when a record of its node is being deleted, so
//     that it empties the volume (and revokes what it holds); a
//     tombstone of its node, seen however late, does the same; a record
//     being deleted loses the node's finalizer as soon as the node holds
//     its lease no more (NodeWatcher.ReleaseWhenDone: an STS session,
//     which nothing can revoke, does not hold its namespace);
//   - the housekeeper (NewHousekeeper, one always-on pod whatever the
//     profile, no backend credential) deletes the record of a pod gone,
//     lets a node's record go once its credential expired, and hands over
//     a record being deleted whose holder is gone (ClusterHolders: the
//     issuer without a leader, the node plugin deregistered), so that no
//     namespace's deletion waits on the PostgreSQL issuer;
//   - the uninstall (helm's pre-delete hook) hands over every finalizer
//     left (HandOverAll) once no pod mounts the driver's volumes.
package inventory
