package sanity

import (
	"context"
	"os"
	"path/filepath"
	"sync"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/kubernetes-csi/csi-test/v5/pkg/sanity"
	. "github.com/onsi/ginkgo/v2"
	. "github.com/onsi/gomega"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/kubelet"
)

// Specs that publish ephemeral volumes as kubelet does, using the suite's
// own connection to the driver.
var _ = sanity.DescribeSanity("Ephemeral inline volumes", func(sc *sanity.TestContext) {
	var (
		k   *kubelet.Kubelet
		pod kubelet.Pod
		vol kubelet.Volume
		ctx = context.Background()
	)
	BeforeEach(func() {
		k = &kubelet.Kubelet{Dir: env.KubeletDir, Node: csi.NewNodeClient(sc.Conn)}
		pod = kubelet.NewPod("sanity", "pod", "default")
		pod.Tokens = map[string]string{"vault": "sanity-token-" + pod.UID}
		harness.RememberSecret(pod.Tokens["vault"])
		vol = kubelet.Volume{Name: "secrets", Attributes: map[string]string{"secretProviderClass": "db"}, ReadOnly: true}
	})
	AfterEach(func() {
		_ = k.Unpublish(ctx, pod, vol.Name)
		_ = k.RemovePod(pod)
	})

	publish := func() (*csi.NodePublishVolumeRequest, error) {
		req, err := k.PublishRequest(pod, vol)
		Expect(err).NotTo(HaveOccurred())
		_, err = k.Node.NodePublishVolume(ctx, req)
		return req, err
	}
	password := func() string {
		b, err := os.ReadFile(filepath.Join(k.TargetPath(pod, vol.Name), "password"))
		Expect(err).NotTo(HaveOccurred())
		harness.RememberSecret(string(b))
		return string(b)
	}

	It("publishes with pod info and unpublishes, removing the target", func() {
		_, err := publish()
		Expect(err).NotTo(HaveOccurred())
		Expect(password()).NotTo(BeEmpty())
		Expect(k.Unpublish(ctx, pod, vol.Name)).To(Succeed())
		_, err = os.Stat(k.TargetPath(pod, vol.Name))
		Expect(os.IsNotExist(err)).To(BeTrue(), "target still exists: %v", err)
	})

	It("is idempotent: a republish with fresh tokens returns OK and keeps the credential", func() {
		_, err := publish()
		Expect(err).NotTo(HaveOccurred())
		first := password()
		pod.Tokens = map[string]string{"vault": "sanity-token-2-" + pod.UID}
		harness.RememberSecret(pod.Tokens["vault"])
		for range 3 {
			_, err = publish()
			Expect(err).NotTo(HaveOccurred())
		}
		Expect(password()).To(Equal(first))
	})

	It("serialises concurrent publishes of one volume into one credential", func() {
		var wg sync.WaitGroup
		errs := make([]error, 8)
		for i := range errs {
			wg.Go(func() { _, errs[i] = publish() })
		}
		wg.Wait()
		for _, err := range errs {
			Expect(err).NotTo(HaveOccurred())
		}
		n, err := pg.CountRoles(ctx, "esc_sanity_pod_")
		Expect(err).NotTo(HaveOccurred())
		Expect(n).To(Equal(1))
		password()
	})

	It("refuses an incompatible re-publish with AlreadyExists and keeps the volume", func() {
		_, err := publish()
		Expect(err).NotTo(HaveOccurred())
		first := password()
		vol.MountGroup = "4321"
		_, err = publish()
		Expect(status.Code(err)).To(Equal(codes.AlreadyExists), "%v", err)
		Expect(password()).To(Equal(first))
	})

	It("returns OK for an unpublish of an unknown volume", func() {
		_, err := k.Node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{
			VolumeId: "csi-never-published", TargetPath: k.TargetPath(pod, "never"),
		})
		Expect(err).NotTo(HaveOccurred())
	})

	It("reports ready through Probe once recovered", func() {
		resp, err := csi.NewIdentityClient(sc.Conn).Probe(ctx, &csi.ProbeRequest{})
		Expect(err).NotTo(HaveOccurred())
		Expect(resp.GetReady().GetValue()).To(BeTrue())
	})
})
