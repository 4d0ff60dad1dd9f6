package realcluster

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	awssdk "github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	autoscalingv1 "k8s.io/api/autoscaling/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/dynamic"
	"sigs.k8s.io/yaml"

	"github.com/ephemeral-secrets/csi-driver/pkg/apis/ephemeralsecrets/v1alpha1"
	"github.com/ephemeral-secrets/csi-driver/test/awstest"
	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/image"
	"github.com/ephemeral-secrets/csi-driver/test/node"
	"github.com/ephemeral-secrets/csi-driver/test/vaulttest"
)

// TestProfiles installs each profile of the chart on the real node, from
// an empty namespace: Vault only, AWS only (MinIO's STS as the AWS), GCP
// only (the Google stand-in), and PostgreSQL through the issuer. Each comes up clean and serves its
// example pod; a tenant namespace with a live pod and its Credential is
// deleted in a bounded time with the driver running, during the driver's
// uninstall, and with the issuer down (each time reported); an uninstall
// refuses while a pod mounts the driver's volumes, and otherwise leaves
// nothing the chart made.
func TestProfiles(t *testing.T) {
	// TestRealCluster leaves the driver's namespace (the Secrets it made
	// there) and the examples' tenant namespace (a Vault class naming its
	// own Vault server, no pod): start from nothing.
	dropNamespace(t, node.Namespace)
	dropNamespace(t, "ai-agents")
	p := &profiles{}
	defer p.close()
	for _, step := range []struct {
		name string
		run  func(*testing.T)
	}{
		{"VaultOnly", p.vaultOnly},
		{"NamespaceDeletionWithTheDriver", p.vaultNamespaceDeletion},
		{"NamespaceDeletionDuringUninstall", p.namespaceDeletionDuringUninstall},
		{"AWSOnly", p.awsOnly},
		{"STSNamespaceDeletionWithTheDriver", p.stsNamespaceDeletion},
		{"UninstallRefusedWhileAPodMounts", p.uninstallRefused},
		{"GCPOnly", p.gcpOnly},
		{"PostgresIssuerDown", p.issuerDown},
	} {
		if !t.Run(step.name, step.run) {
			t.FailNow()
		}
	}
}

// profiles is what the steps share: the backends they started.
type profiles struct {
	vault   *vaulttest.Server
	minio   *awstest.MinIO
	secrets *awstest.Secrets
	closers []func()
	user    string // the Vault example's database user
	// The AWS example's: STS and Secrets Manager as the pods' network
	// reaches them, and the secret's value.
	sts, sm, apiKey string
}

func (p *profiles) close() {
	for i := len(p.closers) - 1; i >= 0; i-- {
		p.closers[i]()
	}
}

// Bounds of the waits: generous, never a timed assertion; the steps
// report what they took.
const (
	namespaceBound = 3 * time.Minute
	uninstallBound = 4 * time.Minute
)

// installProfile installs the chart with the node plugins' backend
// configuration nodeBackends (and the issuer's part of it, if any) and the
// profile's values, then checks it came up clean.
func installProfile(t *testing.T, backends []byte, issuer bool, sets ...string) {
	t.Helper()
	ctx := context.Background()
	args := []string{"-f", filepath.Join(repoRoot, "test/realcluster/testdata/profile-values.yaml")}
	for _, s := range sets {
		args = append(args, "--set", s)
	}
	start := time.Now()
	if err := cluster.InstallDriver(ctx, repoRoot, backends, args...); err != nil {
		t.Fatal(err)
	}
	report(t, fmt.Sprintf("helm install (%s) to the driver registered", strings.Join(sets, ",")), time.Since(start))
	checkClean(t, issuer)
}

// checkClean: the DaemonSet's pod and the housekeeper are ready, the
// issuer runs only in the PostgreSQL profile, and no pod of the release
// restarted.
func checkClean(t *testing.T, issuer bool) {
	t.Helper()
	ctx := context.Background()
	harness.Eventually(t, 2*time.Minute, "the release's pods ready", func() (bool, error) {
		pods, err := cluster.Clients.CoreV1().Pods(node.Namespace).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/instance=ephemeral-secrets-csi"})
		if err != nil {
			return false, err
		}
		seen := map[string]int{}
		for _, p := range pods.Items {
			c := p.Labels["app.kubernetes.io/component"]
			for _, cs := range p.Status.ContainerStatuses {
				if cs.RestartCount != 0 {
					return false, fmt.Errorf("pod %s: container %s restarted %d times (%+v)", p.Name, cs.Name, cs.RestartCount, cs.LastTerminationState)
				}
				if !cs.Ready {
					return false, fmt.Errorf("pod %s not ready", p.Name)
				}
			}
			seen[c]++
		}
		if seen["node"] != 1 || seen["housekeeper"] != 1 || (seen["issuer"] > 0) != issuer {
			return false, fmt.Errorf("pods by component %v (issuer wanted: %v)", seen, issuer)
		}
		return true, nil
	})
	_, err := cluster.Clients.AppsV1().Deployments(node.Namespace).Get(ctx, "ephemeral-secrets-csi-issuer", metav1.GetOptions{})
	if issuer != (err == nil) {
		t.Fatalf("issuer Deployment: %v (wanted: %v)", err, issuer)
	}
}

// timedNamespaceDeletion deletes a namespace, waits (within bound) until
// it is gone, and reports the time.
func timedNamespaceDeletion(t *testing.T, ns, what string) time.Duration {
	t.Helper()
	ctx := context.Background()
	start := time.Now()
	if err := cluster.Clients.CoreV1().Namespaces().Delete(ctx, ns, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	harness.Eventually(t, namespaceBound, "namespace "+ns+" deleted ("+what+")", func() (bool, error) {
		n, err := cluster.Clients.CoreV1().Namespaces().Get(ctx, ns, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return true, nil
		}
		if err != nil {
			return false, err
		}
		creds, _ := inventoryClient(t).List(ctx, ns, metav1.ListOptions{})
		var held []string
		if creds != nil {
			for _, c := range creds.Items {
				held = append(held, c.Name+fmt.Sprint(c.Finalizers))
			}
		}
		return false, fmt.Errorf("phase %s, conditions %v, credentials %v", n.Status.Phase, n.Status.Conditions, held)
	})
	d := time.Since(start)
	report(t, "tenant namespace deleted, "+what, d)
	return d
}

// uninstall runs helm uninstall and returns its error and output.
func uninstall(ctx context.Context) ([]byte, error) {
	return cluster.Helm(ctx, "uninstall", "ephemeral-secrets-csi", "--namespace", node.Namespace, "--wait", "--timeout", "4m")
}

// dropDriverNamespace deletes the release's namespace (the Secrets the
// test made) so that the next profile installs from nothing.
func dropDriverNamespace(t *testing.T) { t.Helper(); dropNamespace(t, node.Namespace) }

// dropNamespace deletes namespace ns, if there, and waits until it is gone.
func dropNamespace(t *testing.T, ns string) {
	t.Helper()
	ctx := context.Background()
	if err := cluster.Clients.CoreV1().Namespaces().Delete(ctx, ns, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
		t.Fatal(err)
	}
	harness.Eventually(t, namespaceBound, "namespace "+ns+" gone", func() (bool, error) {
		_, err := cluster.Clients.CoreV1().Namespaces().Get(ctx, ns, metav1.GetOptions{})
		return apierrors.IsNotFound(err), nil
	})
}

// nothingLeft lists every kind the API server serves (cluster-scoped: all
// of them; namespaced: in the release's namespace) and fails on any object
// of the chart (named for it, or labelled part of it) but the CRDs, which
// the chart keeps on purpose; no Credential anywhere is held by a
// finalizer of the driver, and kubelet no longer lists the driver.
func nothingLeft(t *testing.T) {
	t.Helper()
	ctx := context.Background()
	dc, err := discovery.NewDiscoveryClientForConfig(cluster.Config())
	if err != nil {
		t.Fatal(err)
	}
	dyn, err := dynamic.NewForConfig(cluster.Config())
	if err != nil {
		t.Fatal(err)
	}
	lists, err := dc.ServerPreferredResources()
	if err != nil {
		t.Fatal(err)
	}
	ours := func(name string, labels map[string]string) bool {
		return strings.HasPrefix(name, "ephemeral-secrets-csi") || name == "ephemeral-secrets.csi.dev" ||
			labels["app.kubernetes.io/part-of"] == "ephemeral-secrets-csi"
	}
	kinds := 0
	harness.Eventually(t, time.Minute, "nothing of the chart left", func() (bool, error) {
		var left []string
		kinds = 0
		for _, l := range lists {
			gv, err := schema.ParseGroupVersion(l.GroupVersion)
			if err != nil {
				return false, err
			}
			for _, r := range l.APIResources {
				if strings.Contains(r.Name, "/") || !slices.Contains(r.Verbs, "list") || r.Name == "events" ||
					r.Name == "customresourcedefinitions" || r.Name == v1alpha1.Resource {
					continue
				}
				kinds++
				ri := dyn.Resource(gv.WithResource(r.Name))
				var lister dynamic.ResourceInterface = ri
				if r.Namespaced {
					lister = ri.Namespace(node.Namespace)
				}
				items, err := lister.List(ctx, metav1.ListOptions{})
				if err != nil {
					return false, fmt.Errorf("listing %s: %w", r.Name, err)
				}
				for _, o := range items.Items {
					if ours(o.GetName(), o.GetLabels()) {
						left = append(left, r.Kind+"/"+o.GetName())
					}
				}
			}
		}
		if len(left) > 0 {
			return false, fmt.Errorf("left: %v", left)
		}
		return true, nil
	})
	creds, err := inventoryClient(t).List(ctx, "", metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range creds.Items {
		if slices.Contains(c.Finalizers, v1alpha1.FinalizerRevoke) || slices.Contains(c.Finalizers, v1alpha1.FinalizerNodeRevoke) {
			t.Errorf("Credential %s/%s still held by %v", c.Namespace, c.Name, c.Finalizers)
		}
	}
	harness.Eventually(t, time.Minute, "kubelet to drop the driver from CSINode", func() (bool, error) {
		cn, err := cluster.Clients.StorageV1().CSINodes().Get(ctx, node.Name, metav1.GetOptions{})
		return err == nil && len(cn.Spec.Drivers) == 0, err
	})
	t.Logf("after uninstall: nothing of the chart in %d kinds (cluster-scoped, and namespaced in %s); %d Credentials left, none held",
		kinds, node.Namespace, len(creds.Items))
}

// vaultOnly: the Vault profile, with no PostgreSQL anywhere in the
// chart's values, serves examples/vault.
func (p *profiles) vaultOnly(t *testing.T) {
	ctx := context.Background()
	v, err := vaulttest.StartOn(node.NodeIP)
	if err != nil {
		t.Fatal(err)
	}
	p.vault = v
	p.closers = append(p.closers, v.Close)
	harness.RegisterLog(v.LogFile)
	cfg, err := yaml.Marshal(map[string]any{"vault": map[string]any{"addresses": []string{v.Addr}}})
	if err != nil {
		t.Fatal(err)
	}
	installProfile(t, cfg, false, "providers.vault.enabled=true")
	// setupVault makes its reviewer's ClusterRoleBinding: one left by an
	// earlier step of the package goes first.
	_ = cluster.Clients.RbacV1().ClusterRoleBindings().Delete(ctx, "vault-reviewer", metav1.DeleteOptions{})
	setupVault(t, v)
	p.closers = append(p.closers, func() {
		_ = cluster.Clients.RbacV1().ClusterRoleBindings().Delete(context.Background(), "vault-reviewer", metav1.DeleteOptions{})
	})
	p.user = p.startVaultExample(t)
}

// startVaultExample applies examples/vault and returns the database user
// its pod logged in as.
func (p *profiles) startVaultExample(t *testing.T) string {
	t.Helper()
	created := time.Now()
	applyExampleWith(t, "examples/vault", strings.NewReplacer(
		"https://vault.vault.svc:8200", p.vault.Addr,
		"PGHOST=postgres.databases.svc", "PGHOST="+node.NodeIP,
		"PGPORT=5432", "PGPORT="+strconv.Itoa(db.Port),
	))
	pod := waitPod(t, "ai-agents", "research-agent", 2*time.Minute, corev1.PodRunning)
	waitLog(t, "ai-agents", "research-agent", "agent", time.Minute, `forbidden query refused: .*customers.*42501`)
	report(t, "Vault example pod logged in, after apply", time.Since(created))
	m := regexp.MustCompile(`login ok: user=(v-\S+)`).FindStringSubmatch(podLogs(t, "ai-agents", "research-agent", "agent"))
	if m == nil {
		t.Fatal("db-check did not log in with a Vault database user")
	}
	cred := credentialOf(t, pod)
	if cred.Spec.Provider != "vault" || !slices.Contains(cred.Finalizers, v1alpha1.FinalizerNodeRevoke) {
		t.Fatalf("Credential %s: provider %s, finalizers %v", cred.Name, cred.Spec.Provider, cred.Finalizers)
	}
	harness.RememberSecret(volumeFile(t, pod, "vault", "db-password"))
	return m[1]
}

// vaultNamespaceDeletion (a): the tenant namespace, its pod live and its
// Credential held by the node, is deleted with the driver running; the
// Vault lease is revoked on the way.
func (p *profiles) vaultNamespaceDeletion(t *testing.T) {
	auditRecords(t, driverPod(t))
	timedNamespaceDeletion(t, "ai-agents", "driver running (Vault)")
	roleGone(t, p.user, 2*time.Minute)
}

// namespaceDeletionDuringUninstall (b): helm uninstall starts while a
// tenant pod mounts a volume (its hook waits for the pod), and the tenant
// namespace is deleted meanwhile: both end, in bounded times, and the
// uninstall leaves nothing.
func (p *profiles) namespaceDeletionDuringUninstall(t *testing.T) {
	ctx := context.Background()
	user := p.startVaultExample(t)
	auditRecords(t, driverPod(t))
	start := time.Now()
	done := make(chan error, 1)
	var out []byte
	go func() {
		var err error
		out, err = uninstall(ctx)
		done <- err
	}()
	harness.Eventually(t, time.Minute, "the uninstall hook's Job", func() (bool, error) {
		_, err := cluster.Clients.BatchV1().Jobs(node.Namespace).Get(ctx, "ephemeral-secrets-csi-uninstall", metav1.GetOptions{})
		return err == nil, nil
	})
	timedNamespaceDeletion(t, "ai-agents", "during helm uninstall (Vault)")
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("helm uninstall: %v\n%s", err, out)
		}
	case <-time.After(uninstallBound):
		t.Fatal("helm uninstall did not end")
	}
	report(t, "helm uninstall, started with a tenant pod live", time.Since(start))
	roleGone(t, user, 2*time.Minute)
	nothingLeft(t)
	dropDriverNamespace(t)
}

// forward serves on the node's address a server that listens on the
// test's loopback (the driver's pod reaches only the former), until the
// test ends.
func (p *profiles) forward(t *testing.T, target string) string {
	t.Helper()
	l, err := net.Listen("tcp", net.JoinHostPort(node.NodeIP, "0"))
	if err != nil {
		t.Fatal(err)
	}
	p.closers = append(p.closers, func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				u, err := net.Dial("tcp", target)
				if err != nil {
					return
				}
				defer u.Close()
				go func() { _, _ = io.Copy(u, c) }()
				_, _ = io.Copy(c, u)
			}()
		}
	}()
	return "http://" + l.Addr().String()
}

// awsOnly: the AWS profile serves examples/aws, which has never run in a
// real cluster before: MinIO's STS stands in for AWS's, trusting this
// cluster's service-account issuer (as IRSA trusts EKS's), and a fake
// Secrets Manager (nothing else runs here) serves its secret.
func (p *profiles) awsOnly(t *testing.T) {
	ctx := context.Background()
	// Anyone may read the issuer's discovery document and keys, as on EKS.
	_ = cluster.Clients.RbacV1().ClusterRoleBindings().Delete(ctx, "oidc-discovery-anonymous", metav1.DeleteOptions{})
	if _, err := cluster.Clients.RbacV1().ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "oidc-discovery-anonymous"},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: "system:service-account-issuer-discovery"},
		Subjects:   []rbacv1.Subject{{APIGroup: "rbac.authorization.k8s.io", Kind: "Group", Name: "system:unauthenticated"}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	m, err := awstest.StartMinIOTrusting(cluster.Issuer+"/.well-known/openid-configuration", cluster.CAPEM)
	if err != nil {
		t.Fatal(err)
	}
	p.minio = m
	p.closers = append(p.closers, m.Close)
	harness.RegisterLog(m.LogFile)
	p.secrets = awstest.StartSecrets()
	p.closers = append(p.closers, p.secrets.Close)
	root := s3.New(s3.Options{Region: "us-east-1", BaseEndpoint: awssdk.String(m.URL), UsePathStyle: true,
		Credentials: credentials.NewStaticCredentialsProvider(awstest.RootUser, awstest.RootPassword, "")})
	if _, err := root.CreateBucket(ctx, &s3.CreateBucketInput{Bucket: awssdk.String("reports")}); err != nil {
		t.Fatal(err)
	}
	if _, err := root.PutObject(ctx, &s3.PutObjectInput{Bucket: awssdk.String("reports"), Key: awssdk.String("q3.csv"),
		Body: strings.NewReader("quarter,revenue\nq3,42\n")}); err != nil {
		t.Fatal(err)
	}
	apiKey := "search-" + strconv.FormatInt(time.Now().UnixNano(), 36)
	harness.RememberSecret(apiKey)
	p.secrets.PutSecret("prod/agents/search-api", `{"api_key":"`+apiKey+`"}`)

	// The pods' network reaches the node's address only.
	p.sts = p.forward(t, strings.TrimPrefix(m.URL, "http://"))
	p.sm = p.forward(t, strings.TrimPrefix(p.secrets.URL(), "http://"))
	p.apiKey = apiKey
	example, err := os.ReadFile(filepath.Join(repoRoot, "examples/aws/admin/backends.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var cfg map[string]any
	if err := yaml.Unmarshal(example, &cfg); err != nil {
		t.Fatal(err)
	}
	cfg["aws"].(map[string]any)["endpoints"] = []string{p.sts, p.sm}
	backendsYAML, err := yaml.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	installProfile(t, backendsYAML, false, "providers.aws.enabled=true")
	// The node plugin is the lean one with aws, not the all-in-one.
	for _, c := range driverPod(t).Spec.Containers {
		if c.Name == "driver" && !slices.Equal(c.Command, []string{"/ephemeral-secrets-csi-aws"}) {
			t.Errorf("the node plugin runs %q, want /ephemeral-secrets-csi-aws", c.Command)
		}
	}
	p.startAWSExample(t)
}

// startAWSExample applies examples/aws (its endpoints, role and image
// replaced: the pause image holds the pod, and the test reads S3 with the
// files, as the example's aws-cli would) and checks what its pod got.
func (p *profiles) startAWSExample(t *testing.T) *corev1.Pod {
	t.Helper()
	ctx := context.Background()
	created := time.Now()
	applyExampleWith(t, "examples/aws", strings.NewReplacer(
		"    region: eu-west-1\n", "    region: eu-west-1\n    stsEndpoint: "+p.sts+"\n    secretsManagerEndpoint: "+p.sm+"\n",
		"arn:aws:iam::111122223333:role/research-agent", p.minio.RoleARN,
		"image: amazon/aws-cli", "image: "+image.PauseImage,
		`      command: ["sh", "-c", "aws s3 cp s3://reports/q3.csv - && sleep infinity"]`+"\n", "",
	))
	pod := waitPod(t, "ai-agents", "research-agent", 2*time.Minute, corev1.PodRunning)
	report(t, "AWS example pod Running, after apply", time.Since(created))
	dir := filepath.Join("/var/lib/kubelet/pods", string(pod.UID), "volumes/kubernetes.io~csi/aws/mount")
	if got := volumeFile(t, pod, "aws", "search-api-key"); got != p.apiKey {
		t.Errorf("search-api-key holds %d bytes, not the secret's api_key", len(got))
	}
	cfg, err := config.LoadDefaultConfig(ctx, config.WithRegion("us-east-1"),
		config.WithSharedCredentialsFiles([]string{filepath.Join(dir, "aws")}), config.WithSharedConfigFiles(nil))
	if err != nil {
		t.Fatal(err)
	}
	creds, err := cfg.Credentials.Retrieve(ctx)
	if err != nil {
		t.Fatal(err)
	}
	harness.RememberSecret(creds.SecretAccessKey)
	harness.RememberSecret(creds.SessionToken)
	cl := s3.New(s3.Options{Region: "us-east-1", BaseEndpoint: awssdk.String(p.minio.URL), UsePathStyle: true, Credentials: cfg.Credentials})
	obj, err := cl.GetObject(ctx, &s3.GetObjectInput{Bucket: awssdk.String("reports"), Key: awssdk.String("q3.csv")})
	if err != nil {
		t.Fatalf("reading s3://reports/q3.csv with the pod's session: %v", err)
	}
	body, _ := io.ReadAll(obj.Body)
	obj.Body.Close()
	if !strings.Contains(string(body), "q3,42") {
		t.Errorf("s3://reports/q3.csv read %q", body)
	}
	cred := credentialOf(t, pod)
	if cred.Spec.Provider != "aws" || !slices.Contains(cred.Finalizers, v1alpha1.FinalizerNodeRevoke) || cred.Status.ExpiresAt == nil {
		t.Fatalf("Credential %s: provider %s, finalizers %v, expires %v", cred.Name, cred.Spec.Provider, cred.Finalizers, cred.Status.ExpiresAt)
	}
	return pod
}

// stsNamespaceDeletion (a), STS: an STS session cannot be revoked and
// lives until its expiry (15 minutes here); its Credential being deleted
// with the namespace must not hold the namespace until then.
func (p *profiles) stsNamespaceDeletion(t *testing.T) {
	auditRecords(t, driverPod(t))
	timedNamespaceDeletion(t, "ai-agents", "driver running (AWS STS, 15 min session)")
}

// uninstallRefused: with a pod mounting a volume, helm uninstall fails
// after uninstall.waitForPods, names the pod, and removes nothing; once
// the tenant namespace is gone it succeeds and leaves nothing.
func (p *profiles) uninstallRefused(t *testing.T) {
	ctx := context.Background()
	p.startAWSExample(t)
	start := time.Now()
	out, err := uninstall(ctx)
	if err == nil {
		t.Fatalf("helm uninstall passed with a pod mounting the driver's volume:\n%s", out)
	}
	report(t, "helm uninstall refused (uninstall.waitForPods 1m)", time.Since(start))
	job, jerr := cluster.Clients.BatchV1().Jobs(node.Namespace).Get(ctx, "ephemeral-secrets-csi-uninstall", metav1.GetOptions{})
	if jerr != nil {
		t.Fatalf("the failed hook's Job is not kept for its log: %v", jerr)
	}
	if log := jobLog(t, job); !strings.Contains(log, "ai-agents/research-agent") {
		t.Errorf("the hook's log does not name the pod:\n%s", log)
	}
	if _, err := cluster.Clients.AppsV1().DaemonSets(node.Namespace).Get(ctx, "ephemeral-secrets-csi", metav1.GetOptions{}); err != nil {
		t.Fatalf("the refused uninstall removed the DaemonSet: %v", err)
	}
	timedNamespaceDeletion(t, "ai-agents", "driver running, after a refused uninstall")
	start = time.Now()
	if out, err := uninstall(ctx); err != nil {
		t.Fatalf("helm uninstall: %v\n%s", err, out)
	}
	report(t, "helm uninstall, no tenant pod", time.Since(start))
	nothingLeft(t)
	dropDriverNamespace(t)
}

// jobLog is the log of a Job's pod.
func jobLog(t *testing.T, job *batchv1.Job) string {
	t.Helper()
	pods, err := cluster.Clients.CoreV1().Pods(job.Namespace).List(context.Background(), metav1.ListOptions{LabelSelector: "job-name=" + job.Name})
	if err != nil || len(pods.Items) == 0 {
		t.Fatalf("the Job's pod: %v", err)
	}
	return podLogs(t, job.Namespace, pods.Items[0].Name, pods.Items[0].Spec.Containers[0].Name)
}

// issuerDown (c): PostgreSQL through the issuer; the issuer is scaled to
// zero while the tenant's pod holds a role; the tenant namespace is
// deleted (the housekeeper hands the issuer's record over); when the
// issuer is back, the role is dropped (no record holds it, and the node's
// queued revocation). Then the uninstall leaves nothing, the issuer's own
// run-time objects included.
func (p *profiles) issuerDown(t *testing.T) {
	ctx := context.Background()
	installProfile(t, backends(t), true, "providers.postgres.enabled=true")
	_, role, _, held := startExample(t)
	held.Close(ctx)
	scale := func(n int32) {
		t.Helper()
		if _, err := cluster.Clients.AppsV1().Deployments(node.Namespace).UpdateScale(ctx, "ephemeral-secrets-csi-issuer",
			&autoscalingv1.Scale{ObjectMeta: metav1.ObjectMeta{Name: "ephemeral-secrets-csi-issuer", Namespace: node.Namespace},
				Spec: autoscalingv1.ScaleSpec{Replicas: n}}, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	scale(0)
	harness.Eventually(t, 2*time.Minute, "the issuer's pods gone", func() (bool, error) {
		pods, err := cluster.Clients.CoreV1().Pods(node.Namespace).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=issuer"})
		return err == nil && len(pods.Items) == 0, err
	})
	auditRecords(t, driverPod(t))
	timedNamespaceDeletion(t, "ai-agents", "issuer down (PostgreSQL)")
	scale(2)
	start := time.Now()
	roleGone(t, role, 3*time.Minute)
	report(t, "issuer back -> the role of the handed-over record dropped", time.Since(start))
	// An upgrade that forgets providers.postgres (the issuer ran by
	// default before) is refused, not a silent loss of PostgreSQL.
	upgrade := append([]string{"upgrade", "ephemeral-secrets-csi", filepath.Join(repoRoot, "deploy/helm/ephemeral-secrets-csi"),
		"--namespace", node.Namespace, "-f", filepath.Join(repoRoot, "test/realcluster/testdata/profile-values.yaml")}, node.ChartImageValues()...)
	if _, err := cluster.Helm(ctx, upgrade...); err == nil || !strings.Contains(err.Error(), "providers.postgres.enabled=true") {
		t.Errorf("an upgrade without providers.postgres.enabled: %v; want it refused", err)
	}
	checkClean(t, true)
	start = time.Now()
	if out, err := uninstall(ctx); err != nil {
		t.Fatalf("helm uninstall: %v\n%s", err, out)
	}
	report(t, "helm uninstall (PostgreSQL profile)", time.Since(start))
	nothingLeft(t)
	dropDriverNamespace(t)
}
