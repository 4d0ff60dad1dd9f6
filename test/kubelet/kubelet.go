// Package kubelet plays kubelet against a CSI node plugin: it lays out pod
// directories the way kubelet does and calls NodePublishVolume and
// NodeUnpublishVolume with the volume context kubelet sends for an inline
// (ephemeral) CSI volume with podInfoOnMount and tokenRequests. Tests,
// the demo and the benchmark use it.
package kubelet

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// Pod is a pod as kubelet knows it.
type Pod struct {
	Namespace, Name, UID, ServiceAccount string
	// Tokens are the service-account tokens kubelet passes, by audience.
	Tokens map[string]string
}

// NewPod returns a pod with a fresh UID.
func NewPod(namespace, name, serviceAccount string) Pod {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	h := hex.EncodeToString(b[:])
	uid := h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
	return Pod{Namespace: namespace, Name: name, UID: uid, ServiceAccount: serviceAccount}
}

// Kubelet is a CSI client with kubelet's directory layout.
type Kubelet struct {
	Dir  string
	Node csi.NodeClient
	// TokensInVolumeContext passes service-account tokens in
	// volume_context, as kubelet does for a CSIDriver without
	// serviceAccountTokenInSecrets (the driver's --tokens-in-secrets=false).
	// By default they go in the request's secrets, as deploy/ sets it.
	TokensInVolumeContext bool
	// TokensInSecrets is the default; kept so that callers setting it
	// still build.
	TokensInSecrets bool
	conn            *grpc.ClientConn
}

// Dial connects to a CSI endpoint (unix:///path).
func Dial(endpoint, kubeletDir string) (*Kubelet, error) {
	conn, err := grpc.NewClient("unix://"+trimScheme(endpoint), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, err
	}
	return &Kubelet{Dir: kubeletDir, Node: csi.NewNodeClient(conn), conn: conn}, nil
}

func trimScheme(ep string) string {
	for _, p := range []string{"unix://", "unix:"} {
		if len(ep) >= len(p) && ep[:len(p)] == p {
			return ep[len(p):]
		}
	}
	return ep
}

// Close closes the connection.
func (k *Kubelet) Close() error { return k.conn.Close() }

// Conn is the gRPC connection, for the Identity service.
func (k *Kubelet) Conn() *grpc.ClientConn { return k.conn }

// VolumeID is the ID kubelet gives an inline volume: "csi-" and the
// SHA-256 of the pod's UID followed by the volume's name (kubelet's
// makeVolumeHandle, pkg/volume/csi). The issuer checks it against the pod.
func VolumeID(pod Pod, volume string) string {
	sum := sha256.Sum256([]byte(pod.UID + volume))
	return "csi-" + hex.EncodeToString(sum[:])
}

// TargetPath is where kubelet asks the volume to be mounted.
func (k *Kubelet) TargetPath(pod Pod, volume string) string {
	return filepath.Join(k.Dir, "pods", pod.UID, "volumes", "kubernetes.io~csi", volume, "mount")
}

// Volume is an inline CSI volume of a pod.
type Volume struct {
	Name string
	// Attributes are the pod spec's volumeAttributes.
	Attributes map[string]string
	// MountGroup is the pod's fsGroup, passed as volume_mount_group.
	MountGroup string
	ReadOnly   bool
}

// PublishRequest builds the request kubelet sends, creating the target's
// parent directory as kubelet does.
func (k *Kubelet) PublishRequest(pod Pod, v Volume) (*csi.NodePublishVolumeRequest, error) {
	target := k.TargetPath(pod, v.Name)
	if err := os.MkdirAll(filepath.Dir(target), 0o750); err != nil {
		return nil, err
	}
	vc := map[string]string{}
	for key, val := range v.Attributes {
		vc[key] = val
	}
	vc["csi.storage.k8s.io/pod.name"] = pod.Name
	vc["csi.storage.k8s.io/pod.namespace"] = pod.Namespace
	vc["csi.storage.k8s.io/pod.uid"] = pod.UID
	vc["csi.storage.k8s.io/serviceAccount.name"] = pod.ServiceAccount
	vc["csi.storage.k8s.io/ephemeral"] = "true"
	// As kubelet does: the pod's attributes first, then its own keys; the
	// tokens go in the volume context or, with serviceAccountTokenInSecrets,
	// in secrets (leaving whatever the pod put in its attributes).
	var secrets map[string]string
	if len(pod.Tokens) > 0 {
		toks := map[string]any{}
		for aud, tok := range pod.Tokens {
			toks[aud] = map[string]string{"token": tok, "expirationTimestamp": time.Now().Add(time.Hour).UTC().Format(time.RFC3339)}
		}
		b, _ := json.Marshal(toks)
		if k.TokensInVolumeContext {
			vc["csi.storage.k8s.io/serviceAccount.tokens"] = string(b)
		} else {
			secrets = map[string]string{"csi.storage.k8s.io/serviceAccount.tokens": string(b)}
		}
	}
	return &csi.NodePublishVolumeRequest{
		Secrets:    secrets,
		VolumeId:   VolumeID(pod, v.Name),
		TargetPath: target,
		VolumeCapability: &csi.VolumeCapability{
			AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{VolumeMountGroup: v.MountGroup}},
			AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
		},
		Readonly:      v.ReadOnly,
		VolumeContext: vc,
	}, nil
}

// Publish mounts a pod's volume and returns the target path.
func (k *Kubelet) Publish(ctx context.Context, pod Pod, v Volume) (string, error) {
	req, err := k.PublishRequest(pod, v)
	if err != nil {
		return "", err
	}
	_, err = k.Node.NodePublishVolume(ctx, req)
	return req.TargetPath, err
}

// Unpublish unmounts a pod's volume.
func (k *Kubelet) Unpublish(ctx context.Context, pod Pod, volume string) error {
	_, err := k.Node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{
		VolumeId: VolumeID(pod, volume), TargetPath: k.TargetPath(pod, volume),
	})
	return err
}

// RemovePod removes the pod's directory, as kubelet does once its volumes
// are gone.
func (k *Kubelet) RemovePod(pod Pod) error {
	return os.RemoveAll(filepath.Join(k.Dir, "pods", pod.UID))
}
