package e2e

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/ephemeral-secrets/csi-driver/pkg/lease"
	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/kubelet"
)

// TestBadInput sends kubelet's request with one thing wrong at a time and
// checks the CSI code, and that nothing is left: no mount, no volume
// state, no role, no queued revocation.
func TestBadInput(t *testing.T) {
	ctx := context.Background()
	f := setup(t, "1h", "2h")

	cases := []struct {
		name   string
		pod    kubelet.Pod
		class  string
		mutate func(t *testing.T, req *csi.NodePublishVolumeRequest)
		code   codes.Code
	}{
		{name: "missing volume id", code: codes.InvalidArgument,
			mutate: func(_ *testing.T, r *csi.NodePublishVolumeRequest) { r.VolumeId = "" }},
		{name: "missing target path", code: codes.InvalidArgument,
			mutate: func(_ *testing.T, r *csi.NodePublishVolumeRequest) { r.TargetPath = "" }},
		{name: "missing capability", code: codes.InvalidArgument,
			mutate: func(_ *testing.T, r *csi.NodePublishVolumeRequest) { r.VolumeCapability = nil }},
		{name: "block access type", code: codes.InvalidArgument,
			mutate: func(_ *testing.T, r *csi.NodePublishVolumeRequest) {
				r.VolumeCapability.AccessType = &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}}
			}},
		{name: "not read-only", code: codes.InvalidArgument,
			mutate: func(_ *testing.T, r *csi.NodePublishVolumeRequest) { r.Readonly = false }},
		{name: "target outside the kubelet pods dir", code: codes.InvalidArgument,
			mutate: func(_ *testing.T, r *csi.NodePublishVolumeRequest) {
				r.TargetPath = filepath.Join(f.env.Base, "elsewhere", "mount")
			}},
		{name: "target with dot-dot", code: codes.InvalidArgument,
			mutate: func(_ *testing.T, r *csi.NodePublishVolumeRequest) {
				r.TargetPath = r.TargetPath + "/../../../../../../../etc/mount"
			}},
		{name: "target of another pod", code: codes.InvalidArgument,
			mutate: func(_ *testing.T, r *csi.NodePublishVolumeRequest) {
				other := kubelet.NewPod("team-a", "other", "app")
				r.TargetPath = f.kube.TargetPath(other, "db")
			}},
		{name: "target through a symlink", code: codes.InvalidArgument,
			mutate: func(t *testing.T, r *csi.NodePublishVolumeRequest) {
				// pods/<uid>/volumes -> a directory outside kubelet's tree
				uid := r.VolumeContext["csi.storage.k8s.io/pod.uid"]
				outside := filepath.Join(f.env.Base, "outside")
				if err := os.MkdirAll(filepath.Join(outside, "kubernetes.io~csi", "db"), 0o750); err != nil {
					t.Fatal(err)
				}
				vols := filepath.Join(f.env.KubeletDir, "pods", uid, "volumes")
				if err := os.RemoveAll(vols); err != nil {
					t.Fatal(err)
				}
				if err := os.Symlink(outside, vols); err != nil {
					t.Fatal(err)
				}
			}},
		{name: "user-supplied csi.storage.k8s.io attribute", code: codes.InvalidArgument,
			mutate: func(_ *testing.T, r *csi.NodePublishVolumeRequest) {
				r.VolumeContext["csi.storage.k8s.io/serviceAccount.audience"] = "admin"
			}},
		{name: "unknown attribute", code: codes.InvalidArgument,
			mutate: func(_ *testing.T, r *csi.NodePublishVolumeRequest) { r.VolumeContext["role"] = "admin" }},
		{name: "no pod info", code: codes.InvalidArgument,
			mutate: func(_ *testing.T, r *csi.NodePublishVolumeRequest) {
				delete(r.VolumeContext, "csi.storage.k8s.io/pod.name")
			}},
		{name: "malformed tokens", code: codes.InvalidArgument,
			mutate: func(_ *testing.T, r *csi.NodePublishVolumeRequest) {
				r.VolumeContext["csi.storage.k8s.io/serviceAccount.tokens"] = "{not json"
			}},
		{name: "non-numeric mount group", code: codes.InvalidArgument,
			mutate: func(_ *testing.T, r *csi.NodePublishVolumeRequest) {
				r.VolumeCapability.GetMount().VolumeMountGroup = "wheel"
			}},
		{name: "no class named", code: codes.InvalidArgument,
			mutate: func(_ *testing.T, r *csi.NodePublishVolumeRequest) { delete(r.VolumeContext, "secretProviderClass") }},
		{name: "unknown class", class: "no-such-class", code: codes.NotFound},
		{name: "class of another namespace", pod: withToken(kubelet.NewPod("team-b", "intruder", "app")), class: "app-db", code: codes.NotFound},
		{name: "unauthorised service account", pod: withToken(kubelet.NewPod("team-a", "nosy", "app")), class: "payroll", code: codes.PermissionDenied},
		{name: "file name with dot-dot", class: "escape", code: codes.InvalidArgument},
		{name: "absolute file name", class: "absolute", code: codes.InvalidArgument},
		{name: "oversized output", class: "huge", code: codes.ResourceExhausted},
		{name: "sync to a Kubernetes Secret", class: "synced", code: codes.InvalidArgument},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			pod := tc.pod
			if pod.UID == "" {
				pod = newPod("bad", "app")
			}
			class := tc.class
			if class == "" {
				class = "app-db"
			}
			req, err := f.kube.PublishRequest(pod, dbVolume(class))
			if err != nil {
				t.Fatal(err)
			}
			if tc.mutate != nil {
				tc.mutate(t, req)
			}
			_, err = f.kube.Node.NodePublishVolume(ctx, req)
			if got := status.Code(err); got != tc.code {
				t.Fatalf("code %s (%v), want %s", got, err, tc.code)
			}
			if status.Convert(err).Message() == "" {
				t.Errorf("error without a message")
			}
			assertNothingLeft(t, f, pod)
		})
	}
}

func assertNothingLeft(t *testing.T, f *fixture, pod kubelet.Pod) {
	t.Helper()
	if m := harness.Mounts(filepath.Join(f.env.KubeletDir, "pods")); len(m) != 0 {
		t.Errorf("mounts left under the kubelet dir: %v", m)
	}
	if m := harness.Mounts(filepath.Join(f.env.StateDir, "volumes")); len(m) != 0 {
		t.Errorf("volume tmpfs left: %v", m)
	}
	if entries, _ := os.ReadDir(filepath.Join(f.env.StateDir, "volumes")); len(entries) != 0 {
		t.Errorf("%d volume directories left", len(entries))
	}
	if _, err := os.Stat(f.kube.TargetPath(pod, "db")); err == nil {
		t.Errorf("target directory left")
	}
	ctx := context.Background()
	harness.Eventually(t, 10*time.Second, "no role and no queued revocation left", func() (bool, error) {
		n, err := pg.CountRoles(ctx, "esc_")
		if err != nil || n != 0 {
			return false, err
		}
		store, err := storageOf(f)
		if err != nil {
			return false, err
		}
		inv, err := lease.ReadInventory(lease.NewStateRecords(store))
		return len(inv.Live) == 0 && len(inv.Pending) == 0, err
	})
}
