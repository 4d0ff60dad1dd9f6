// Package record writes and watches the Credential records (the
// inventory's objects) as one holder does: the CRD's REST client
// (Client), a shared informer of the records (NewInformer), a record
// made from a credential.Record and the writes of one finalizer's holder
// (Store: create, status, release), and the node plugin's NodeRecorder
// and NodeWatcher. It imports pkg/apis/ephemeralsecrets/v1alpha1 and
// pkg/credential, client-go's REST client and cache only: no typed
// clientset and nothing of the issuer, so that the node plugin links
// neither. pkg/inventory (the issuer's recorder, the controller, the
// housekeeper) builds on it.
package record
