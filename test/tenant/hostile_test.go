package tenant

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider/gcp"
	"github.com/ephemeral-secrets/csi-driver/test/gcptest"
	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/kube"
	"github.com/ephemeral-secrets/csi-driver/test/kubelet"
	"github.com/ephemeral-secrets/csi-driver/test/standin"
)

// hostile is one class or pod a tenant may write, and what must happen.
type hostile struct {
	name     string
	provider string
	params   map[string]string
	// pod changes the pod or the request kubelet sends (a pod's
	// volumeAttributes, a pod without tokens...).
	pod func(p *kubelet.Pod, v *kubelet.Volume)
	// req changes the request kubelet sends (the secrets of a
	// nodePublishSecretRef).
	req  func(r *csi.NodePublishVolumeRequest)
	code codes.Code
	// reaches names the one listener that may see a request: "vault" (the
	// admin's Vault, trusted), "sts" (the admin's STS endpoint), "gcp"
	// (the admin's Google stand-in); "" none.
	reaches string
}

// node is the world of one hostile suite: the canaries planted, the
// listeners and the driver.
type node struct {
	canaries *canaries
	vault    *standin.Server // the admin's Vault address, verified with the admin's CA
	rogue    *standin.Server // an address the admin lists but whose certificate nobody vouches for
	sts      *standin.Server // the admin's STS endpoint
	google   *gcptest.Server // the admin's Google endpoints (STS, IAM Credentials, Secret Manager)
	api      *kube.Cluster   // the service-account issuer Google's workload identity provider trusts
	offList  *standin.TCP
	f        *fixture
}

func vaultParams(n *node, extra map[string]string) map[string]string {
	p := map[string]string{"vaultAddress": n.vault.URL, "roleName": "app", "vaultAuthMountPath": "jwt",
		"objects": "- {objectName: password, secretPath: database/creds/app, secretKey: password}"}
	for k, v := range extra {
		p[k] = v
	}
	return p
}

func awsParams(n *node, extra map[string]string) map[string]string {
	return with(map[string]string{"region": "us-east-1", "roleArn": "arn:aws:iam::111122223333:role/app", "stsEndpoint": n.sts.URL,
		"objects": "- {objectName: session, objectType: sts}\n- {objectName: db, objectType: secretsmanager}"}, extra)
}

// with is p with the parameters of extra set, those of an empty value
// removed.
func with(p, extra map[string]string) map[string]string {
	for k, v := range extra {
		if v == "" {
			delete(p, k)
			continue
		}
		p[k] = v
	}
	return p
}

const (
	gcpAudience = "//iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/esc/providers/kube"
	gcpSA       = "app-reader@proj-a.iam.gserviceaccount.com"
)

// gcpParams is a class the admin's gcp section allows; an empty value
// in extra removes the parameter.
func gcpParams(extra map[string]string) map[string]string {
	return with(map[string]string{"secrets": "- {resourceName: projects/proj-a/secrets/db/versions/latest, path: db}"}, extra)
}

// withGCPToken makes the pod in the kube-apiserver and gives it the
// service-account token kubelet would ask for, which the Google stand-in
// validates against that API server's JWKS.
func withGCPToken(n *node) func(*kubelet.Pod, *kubelet.Volume) {
	return func(p *kubelet.Pod, _ *kubelet.Volume) {
		tok, uid, err := gcptest.PodToken(context.Background(), n.api.Config(), p.Namespace, p.ServiceAccount, p.Name, "https:"+gcpAudience)
		if err != nil {
			panic(err)
		}
		harness.RememberSecret(tok)
		p.UID = uid
		p.Tokens["https:"+gcpAudience] = tok
	}
}

func pgParams(extra map[string]string) map[string]string {
	p := map[string]string{"connection": "main", "role": "reader"}
	for k, v := range extra {
		p[k] = v
	}
	return p
}

func tmpl(t string) map[string]string {
	return pgParams(map[string]string{"files": "- {path: out, template: '" + t + "'}"})
}

func setPodAttr(k, v string) func(*kubelet.Pod, *kubelet.Volume) {
	return func(_ *kubelet.Pod, vol *kubelet.Volume) { vol.Attributes[k] = v }
}

// cases are every weakness of issue 10 and every parameter a class can set.
func cases(n *node) []hostile {
	c := n.canaries
	var many strings.Builder
	for i := range 64 {
		fmt.Fprintf(&many, "- {path: f%d, template: '{{printf \"%%01000000d\" 0}}{{printf \"%%01000000d\" 0}}{{printf \"%%01000000d\" 0}}{{printf \"%%01000000d\" 0}}'}\n", i)
	}
	double := `{{$a := printf "%s%s" .password .password}}` + strings.Repeat(`{{$a = printf "%s%s" $a $a}}`, 60) + `{{$a}}`
	forged := `{"vault":{"token":"forged-token-of-the-pods-choosing","expirationTimestamp":"2030-01-01T00:00:00Z"}}`
	return []hostile{
		// 1. class-named files, and the oracle in the error
		{name: "vault CA = kubelet client cert", provider: "vault", params: vaultParams(n, map[string]string{"vaultCACertPath": c.KubeletCert}), code: codes.InvalidArgument},
		{name: "vault CA = backend config copy", provider: "vault", params: vaultParams(n, map[string]string{"vaultCACertPath": c.BackendsCopy}), code: codes.InvalidArgument},
		{name: "vault CA = missing file", provider: "vault", params: vaultParams(n, map[string]string{"vaultCACertPath": "/nonexistent/ca.pem"}), code: codes.InvalidArgument},
		{name: "vault CA directory", provider: "vault", params: vaultParams(n, map[string]string{"vaultCADirectory": c.CADir}), code: codes.InvalidArgument},
		{name: "vault client cert = kubelet's", provider: "vault", params: vaultParams(n, map[string]string{"vaultTLSClientCertPath": c.KubeletCert, "vaultTLSClientKeyPath": c.KubeletCert}), code: codes.InvalidArgument},
		{name: "vault client key = another pod's", provider: "vault", params: vaultParams(n, map[string]string{"vaultTLSClientKeyPath": c.OtherPodKey}), code: codes.InvalidArgument},
		// 2. a class can crash the node's driver
		{name: "vault CA = /dev/zero", provider: "vault", params: vaultParams(n, map[string]string{"vaultCACertPath": "/dev/zero"}), code: codes.InvalidArgument},
		// 3. verification off
		{name: "vault skip verify, rogue address", provider: "vault", params: vaultParams(n, map[string]string{"vaultAddress": n.rogue.URL, "vaultSkipTLSVerify": "true"}), code: codes.InvalidArgument},
		{name: "vault skip verify, admin's address", provider: "vault", params: vaultParams(n, map[string]string{"vaultSkipTLSVerify": "true"}), code: codes.InvalidArgument},
		{name: "vault unverified address, no skip", provider: "vault", params: vaultParams(n, map[string]string{"vaultAddress": n.rogue.URL}), code: codes.Unavailable},
		{name: "vault server name of another", provider: "vault", params: vaultParams(n, map[string]string{"vaultTLSServerName": "kubernetes.default.svc"}), code: codes.InvalidArgument},
		{name: "vault profile of another namespace", provider: "vault", params: vaultParams(n, map[string]string{"vaultTLSProfile": "team-b-only"}), code: codes.PermissionDenied},
		{name: "vault unknown profile", provider: "vault", params: vaultParams(n, map[string]string{"vaultTLSProfile": "root"}), code: codes.InvalidArgument},
		// 4. templates that pin a core
		{name: "range 10^12", provider: "postgres", params: tmpl(`{{range 1000000000000}}{{end}}`), code: codes.InvalidArgument},
		{name: "nested ranges", provider: "postgres", params: tmpl(`{{range 100000}}{{range 100000}}{{range 100000}}{{end}}{{end}}{{end}}`), code: codes.InvalidArgument},
		{name: "range over a computed length", provider: "postgres", params: tmpl(`{{range $k, $v := .}}{{range (len (printf "%0900000d" 0))}}{{end}}{{end}}`), code: codes.InvalidArgument},
		// 5. templates that amplify memory
		{name: "printf doubling", provider: "postgres", params: tmpl(double), code: codes.ResourceExhausted},
		{name: "printf width", provider: "postgres", params: tmpl(`{{printf "%0999999999999d" 0}}`), code: codes.InvalidArgument},
		{name: "printf width from an argument", provider: "postgres", params: tmpl(`{{$f := print "%" "*d"}}{{printf $f 999999999 0}}`), code: codes.InvalidArgument},
		{name: "64 files of 4 MiB", provider: "postgres", params: pgParams(map[string]string{"files": many.String()}), code: codes.ResourceExhausted},
		{name: "template calls a template", provider: "postgres", params: tmpl(`{{define "x"}}{{template "x"}}{{end}}{{template "x"}}`), code: codes.InvalidArgument},
		// 6. tokens go where a class says
		{name: "vault audience of STS", provider: "vault", params: vaultParams(n, map[string]string{"audience": "sts.amazonaws.com"}), code: codes.InvalidArgument},
		{name: "aws audience of Vault", provider: "aws", params: awsParams(n, map[string]string{"audience": "vault"}), code: codes.InvalidArgument},
		// 7. a pod chooses its own token
		{name: "pod sets the tokens attribute", provider: "vault", params: vaultParams(n, nil),
			pod: setPodAttr("csi.storage.k8s.io/serviceAccount.tokens", forged), code: codes.InvalidArgument},
		{name: "pod sets the tokens attribute, no tokenRequests", provider: "vault", params: vaultParams(n, nil),
			pod: func(p *kubelet.Pod, v *kubelet.Volume) {
				p.Tokens = nil
				v.Attributes["csi.storage.k8s.io/serviceAccount.tokens"] = forged
			}, code: codes.InvalidArgument},
		{name: "pod's Secret holds another service account's token, no tokenRequests", provider: "vault", params: vaultParams(n, nil),
			pod: func(p *kubelet.Pod, _ *kubelet.Volume) { p.Tokens = nil },
			req: func(r *csi.NodePublishVolumeRequest) {
				r.Secrets = map[string]string{"csi.storage.k8s.io/serviceAccount.tokens": fmt.Sprintf(`{"vault":{"token":%q}}`,
					standin.Token("team-a", "vault-admin", r.VolumeContext["csi.storage.k8s.io/pod.uid"], "vault"))}
			}, code: codes.PermissionDenied},
		{name: "pod's Secret holds a token bound to another pod", provider: "aws", params: awsParams(n, nil),
			pod: func(p *kubelet.Pod, _ *kubelet.Volume) { p.Tokens = nil },
			req: func(r *csi.NodePublishVolumeRequest) {
				r.Secrets = map[string]string{"csi.storage.k8s.io/serviceAccount.tokens": fmt.Sprintf(`{"sts.amazonaws.com":{"token":%q}}`,
					standin.Token("team-a", "app", "0b9e2f36-6a7c-4d3e-9f4e-3a1c2b5d6e7f", "sts.amazonaws.com"))}
			}, code: codes.PermissionDenied},
		{name: "pod sets a class parameter", provider: "vault", params: vaultParams(n, nil), pod: setPodAttr("vaultAddress", n.offList.URL("http")), code: codes.InvalidArgument},
		// 8. checks before side effects
		{name: "aws secrets manager endpoint off the list", provider: "aws", params: awsParams(n, map[string]string{"secretsManagerEndpoint": n.offList.URL("http")}), code: codes.PermissionDenied},
		{name: "aws ssm endpoint off the list", provider: "aws", params: awsParams(n, map[string]string{"ssmEndpoint": n.offList.URL("http"),
			"objects": "- {objectName: session, objectType: sts}\n- {objectName: /p, objectType: ssmparameter}"}), code: codes.PermissionDenied},
		{name: "aws sts endpoint off the list", provider: "aws", params: awsParams(n, map[string]string{"stsEndpoint": n.offList.URL("http")}), code: codes.PermissionDenied},
		{name: "aws session from the node's credentials", provider: "aws", params: awsParams(n, map[string]string{"objects": "- {objectName: s, objectType: sts, assumeWith: node}\n- {objectName: t, objectType: sts}"}), code: codes.PermissionDenied},
		{name: "aws region is a host", provider: "aws", params: awsParams(n, map[string]string{"stsEndpoint": "", "region": strings.TrimPrefix(n.offList.URL("http"), "http://") + "/#"}), code: codes.InvalidArgument},
		{name: "aws failover region is a host", provider: "aws", params: awsParams(n, map[string]string{"failoverRegion": "evil.example.com"}), code: codes.InvalidArgument},
		// every other parameter a class can set
		{name: "vault address off the list", provider: "vault", params: vaultParams(n, map[string]string{"vaultAddress": n.offList.URL("http")}), code: codes.PermissionDenied},
		{name: "vault role of another", provider: "vault", params: vaultParams(n, map[string]string{"roleName": "admin"}), code: codes.PermissionDenied, reaches: "vault"},
		{name: "vault auth mount with dot-dot", provider: "vault", params: vaultParams(n, map[string]string{"vaultAuthMountPath": "../sys"}), code: codes.InvalidArgument},
		{name: "vault object name escapes", provider: "vault", params: vaultParams(n, map[string]string{"objects": "- {objectName: ../../etc/x, secretPath: secret/data/a}"}), code: codes.InvalidArgument},
		{name: "aws session name escapes", provider: "aws", params: awsParams(n, map[string]string{"objects": "- {objectName: ../../etc/x, objectType: sts}"}), code: codes.InvalidArgument},
		{name: "aws alias escapes", provider: "aws", params: awsParams(n, map[string]string{"objects": "- {objectName: s, objectType: sts}\n- {objectName: db, objectType: secretsmanager, objectAlias: /etc/x}"}), code: codes.InvalidArgument},
		{name: "aws jmesPath alias escapes", provider: "aws", params: awsParams(n, map[string]string{"objects": "- {objectName: s, objectType: sts}\n- {objectName: db, objectType: secretsmanager, jmesPath: [{path: a, objectAlias: ..data}]}"}), code: codes.InvalidArgument},
		{name: "vault secret path with dot-dot", provider: "vault", params: vaultParams(n, map[string]string{"objects": "- {objectName: a, secretPath: secret/../sys/policy}"}), code: codes.InvalidArgument},
		{name: "vault old auth mount", provider: "vault", params: vaultParams(n, map[string]string{"vaultAuthMountPath": "", "vaultKubernetesMountPath": "kubernetes"}), code: codes.PermissionDenied, reaches: "vault"},
		{name: "vault namespace of another", provider: "vault", params: vaultParams(n, map[string]string{"vaultNamespace": "team-b"}), code: codes.PermissionDenied, reaches: "vault"},
		{name: "vault objects not a list", provider: "vault", params: vaultParams(n, map[string]string{"objects": "{x: 1}"}), code: codes.InvalidArgument},
		{name: "vault object method DELETE", provider: "vault", params: vaultParams(n, map[string]string{"objects": "- {objectName: a, secretPath: sys/seal, method: DELETE}"}), code: codes.InvalidArgument},
		{name: "vault renewBefore not a duration", provider: "vault", params: vaultParams(n, map[string]string{"renewBefore": "soon"}), code: codes.InvalidArgument},
		{name: "vault token as a parameter", provider: "vault", params: vaultParams(n, map[string]string{"vaultToken": "s.root"}), code: codes.InvalidArgument},
		{name: "aws allowed endpoint reaches STS only", provider: "aws", params: awsParams(n, nil), code: codes.PermissionDenied, reaches: "sts"},
		{name: "aws duration beyond STS's", provider: "aws", params: awsParams(n, map[string]string{"objects": "- {objectName: s, objectType: sts, durationSeconds: 999999}"}), code: codes.InvalidArgument},
		{name: "aws unknown object type", provider: "aws", params: awsParams(n, map[string]string{"objects": "- {objectName: s, objectType: s3}"}), code: codes.InvalidArgument},
		{name: "aws rotation poll too fast", provider: "aws", params: awsParams(n, map[string]string{"rotationPollInterval": "1ms"}), code: codes.InvalidArgument},
		{name: "aws access key as a parameter", provider: "aws", params: awsParams(n, map[string]string{"accessKey": "AKIA"}), code: codes.InvalidArgument},
		{name: "aws secrets without roleArn", provider: "aws", params: awsParams(n, map[string]string{"roleArn": "", "objects": "- {objectName: db, objectType: secretsmanager}"}), code: codes.InvalidArgument},
		{name: "gcp sts endpoint off the list", provider: "gcp", params: gcpParams(map[string]string{"stsEndpoint": n.offList.URL("https")}), code: codes.InvalidArgument},
		{name: "gcp iam credentials endpoint off the list", provider: "gcp", params: gcpParams(map[string]string{"iamCredentialsEndpoint": n.offList.URL("https")}), code: codes.InvalidArgument},
		{name: "gcp secret manager endpoint off the list", provider: "gcp", params: gcpParams(map[string]string{"secretManagerEndpoint": n.offList.URL("https")}), code: codes.InvalidArgument},
		{name: "gcp audience of another provider", provider: "gcp", params: gcpParams(map[string]string{"audience": "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/other/providers/x"}), code: codes.InvalidArgument},
		{name: "gcp service account not mapped", provider: "gcp", params: gcpParams(map[string]string{"serviceAccount": "owner@proj-a.iam.gserviceaccount.com"}), code: codes.InvalidArgument},
		{name: "gcp service account mapped to another pod identity", provider: "gcp", params: gcpParams(map[string]string{"serviceAccount": gcpSA}),
			pod: func(p *kubelet.Pod, _ *kubelet.Volume) { p.ServiceAccount = "intruder" }, code: codes.InvalidArgument},
		{name: "gcp project not allowed", provider: "gcp", params: gcpParams(map[string]string{"secrets": "- {resourceName: projects/proj-b/secrets/db/versions/1, path: db}"}), code: codes.InvalidArgument},
		{name: "gcp node's identity (provider-adc)", provider: "gcp", params: gcpParams(map[string]string{"auth": "provider-adc"}), code: codes.InvalidArgument},
		{name: "gcp path escapes", provider: "gcp", params: gcpParams(map[string]string{"secrets": "- {resourceName: projects/proj-a/secrets/db/versions/1, path: ../../etc/x}"}), code: codes.InvalidArgument},
		{name: "gcp fileName escapes", provider: "gcp", params: gcpParams(map[string]string{"secrets": "- {resourceName: projects/proj-a/secrets/db/versions/1, fileName: ../x}"}), code: codes.InvalidArgument},
		{name: "gcp fileName ..data", provider: "gcp", params: gcpParams(map[string]string{"secrets": "- {resourceName: projects/proj-a/secrets/db/versions/1, fileName: ..data}"}), code: codes.InvalidArgument},
		{name: "gcp accessTokenFile escapes", provider: "gcp", params: gcpParams(map[string]string{"accessTokenFile": "../../etc/token"}), code: codes.InvalidArgument},
		{name: "gcp accessTokenJSONFile absolute", provider: "gcp", params: gcpParams(map[string]string{"accessTokenJSONFile": "/etc/token.json"}), code: codes.InvalidArgument},
		{name: "gcp resource name with dot-dot", provider: "gcp", params: gcpParams(map[string]string{"secrets": "- {resourceName: projects/proj-a/secrets/../versions/1, path: db}"}), code: codes.InvalidArgument},
		{name: "gcp mode executable", provider: "gcp", params: gcpParams(map[string]string{"secrets": "- {resourceName: projects/proj-a/secrets/db/versions/1, path: db, mode: 0755}"}), code: codes.InvalidArgument},
		{name: "gcp mode setuid", provider: "gcp", params: gcpParams(map[string]string{"secrets": "- {resourceName: projects/proj-a/secrets/db/versions/1, path: db, mode: 04444}"}), code: codes.InvalidArgument},
		{name: "gcp credentials as a parameter", provider: "gcp", params: gcpParams(map[string]string{"credentials": "{}"}), code: codes.InvalidArgument},
		{name: "gcp value over 64 KiB", provider: "gcp", params: gcpParams(map[string]string{"secrets": "- {resourceName: projects/proj-a/secrets/big/versions/latest, path: big}"}),
			pod: withGCPToken(n), code: codes.InvalidArgument, reaches: "gcp"},
		{name: "postgres unknown connection", provider: "postgres", params: pgParams(map[string]string{"connection": "admin"}), code: codes.InvalidArgument},
		{name: "postgres unknown role", provider: "postgres", params: pgParams(map[string]string{"role": "superuser"}), code: codes.InvalidArgument},
		{name: "postgres ttl beyond maxTTL", provider: "postgres", params: pgParams(map[string]string{"ttl": "1000h"}), code: codes.InvalidArgument},
		{name: "postgres ttl too short", provider: "postgres", params: pgParams(map[string]string{"ttl": "1ms"}), code: codes.InvalidArgument},
		{name: "postgres url as a parameter", provider: "postgres", params: pgParams(map[string]string{"url": "postgres://x@127.0.0.1/"}), code: codes.InvalidArgument},
		{name: "postgres role of another service account", provider: "postgres", params: pgParams(nil),
			pod: func(p *kubelet.Pod, _ *kubelet.Volume) { p.ServiceAccount = "intruder" }, code: codes.PermissionDenied},
		{name: "file path escapes", provider: "postgres", params: pgParams(map[string]string{"files": "- {path: ../../etc/x, value: password}"}), code: codes.InvalidArgument},
		{name: "file path ..data", provider: "postgres", params: pgParams(map[string]string{"files": "- {path: ..data/x, value: password}"}), code: codes.InvalidArgument},
		{name: "file mode setuid", provider: "postgres", params: pgParams(map[string]string{"fileMode": "4755"}), code: codes.InvalidArgument},
		{name: "provider unknown", provider: "exec", params: map[string]string{"command": "id"}, code: codes.InvalidArgument},
	}
}

// TestHostileClassesAndPods publishes every hostile case and checks its
// code, that no canary was opened, that no listener saw what it must not,
// and that nothing is left; at the end, that the driver lives and its peak
// memory stayed bounded.
func TestHostileClassesAndPods(t *testing.T) {
	ctx := context.Background()
	env := newEnv(t)
	n := &node{canaries: plantCanaries(t, env.Base, env.KubeletDir), offList: standin.NewTCP(t),
		vault: standin.New(t, true), rogue: standin.New(t, true), sts: standin.New(t, false)}
	n.api = realCluster(t)
	n.google = gcptest.Start(t, gcptest.Options{Issuer: n.api.Issuer, OIDCClient: gcptest.OIDCClient(n.api.CAPEM, kube.AdminToken), Audience: gcpAudience})
	n.google.AllowImpersonation(gcpSA, n.google.Principal("team-a", "app"))
	// A value one byte over Secret Manager's limit, which the real one
	// would never hold: the driver refuses it, whoever serves it.
	big := "projects/proj-a/secrets/big"
	n.google.GrantAccess(big, gcptest.ServiceAccountPrincipal(gcpSA))
	n.google.AddVersion(big, []byte(strings.Repeat("B", gcp.MaxValueBytes+1)))
	t.Cleanup(func() {
		for _, tok := range n.google.Issued() {
			harness.RememberSecret(tok)
		}
	})

	// The watch can see an open: a check that cannot fail is no check.
	if f, err := os.Open(n.canaries.KubeletCert); err == nil {
		f.Close()
	}
	if got := n.canaries.opened(); !slices.Contains(got, n.canaries.KubeletCert) {
		t.Fatalf("the canary watch did not see an open: %v", got)
	}

	backends := pgBackend() + fmt.Sprintf(`vault:
  addresses: [%[1]q, %[2]q]
  tls:
    %[1]q: {caCert: %[3]q}
  tlsProfiles:
    team-b-only: {caCert: %[3]q, namespaces: [team-b]}
aws:
  region: us-east-1
  endpoints: [%[4]q]
gcp:
  audience: %[5]q
  stsEndpoint: %[6]q
  iamCredentialsEndpoint: %[6]q
  secretManagerEndpoint: %[6]q
  projects: [proj-a]
  serviceAccounts:
    team-a/app: [%[7]q]
  tls:
    %[6]q: {caCert: %[8]q}
`, n.vault.URL, n.rogue.URL, n.vault.CAFile, n.sts.URL, gcpAudience, n.google.URL, gcpSA, n.google.CAFile)
	all := cases(n)
	var docs []string
	for i, c := range all {
		docs = append(docs, class("team-a", fmt.Sprintf("c%02d", i), c.provider, c.params))
	}
	n.f = start(t, env, strings.Join(docs, "---\n"), backends)
	before, cpu := peakRSS(t, n.f.driver.Pid()), cpuTime(t, n.f.driver.Pid())
	secretsOfCases := []string{"CANARY-ADMIN-PASSWORD", "forged-token", "BEGIN", n.canaries.KubeletCert, n.canaries.OtherPodKey,
		n.canaries.BackendsCopy, n.canaries.CADir, "/dev/zero", "/nonexistent"}

	for i, c := range all {
		t.Run(c.name, func(t *testing.T) {
			p := pod("team-a", fmt.Sprintf("hostile-%02d", i))
			v := volume(fmt.Sprintf("c%02d", i))
			if c.pod != nil {
				c.pod(&p, &v)
			}
			_, vaultReqs, _ := n.vault.Seen()
			_, rogueReqs, _ := n.rogue.Seen()
			_, stsReqs, _ := n.sts.Seen()
			googleCalls := n.google.Calls("")
			off := n.offList.Seen()

			req, err := n.f.kube.PublishRequest(p, v)
			if err != nil {
				t.Fatal(err)
			}
			if c.req != nil {
				c.req(req)
			}
			_, err = n.f.kube.Node.NodePublishVolume(ctx, req)
			if got := status.Code(err); got != c.code {
				t.Fatalf("code %s (%v), want %s", got, err, c.code)
			}
			msg := status.Convert(err).Message()
			for _, s := range secretsOfCases {
				if strings.Contains(msg, s) {
					t.Errorf("the error quotes %q: %s", s, msg)
				}
			}
			if opened := n.canaries.opened(); len(opened) != 0 {
				t.Errorf("the driver opened planted files: %v", opened)
			}
			if d := n.offList.Seen() - off; d != 0 {
				t.Errorf("%d connections to an address on no list", d)
			}
			_, r, _ := n.rogue.Seen()
			if r != rogueReqs {
				t.Errorf("a request reached a server nobody vouches for")
			}
			_, r, _ = n.vault.Seen()
			if (r != vaultReqs) != (c.reaches == "vault") {
				t.Errorf("Vault saw %d requests (reaches %q)", r-vaultReqs, c.reaches)
			}
			_, r, _ = n.sts.Seen()
			if (r != stsReqs) != (c.reaches == "sts") {
				t.Errorf("STS saw %d requests (reaches %q)", r-stsReqs, c.reaches)
			}
			if d := n.google.Calls("") - googleCalls; (d != 0) != (c.reaches == "gcp") {
				t.Errorf("the Google stand-in had %d calls (reaches %q)", d, c.reaches)
			}
			assertNothingLeft(t, n.f, p)
		})
	}

	if _, _, certs := n.vault.Seen(); len(certs) != 0 {
		t.Errorf("client certificates presented to Vault: %v (the admin configured none)", certs)
	}
	resp, err := csi.NewIdentityClient(n.f.kube.Conn()).Probe(ctx, &csi.ProbeRequest{})
	if err != nil || !resp.GetReady().GetValue() {
		t.Fatalf("the driver does not answer after the hostile cases: %v", err)
	}
	peak := peakRSS(t, n.f.driver.Pid())
	t.Logf("driver peak RSS: %d MiB at start, %d MiB after %d hostile cases, which took %s of its CPU",
		before>>20, peak>>20, len(all), cpuTime(t, n.f.driver.Pid())-cpu)
	// The issue measured +689 MiB (printf widths) and +373 MiB (64 files)
	// with the old code; each budget holds a volume to a few MiB.
	if peak-before > 128<<20 {
		t.Errorf("peak RSS grew by %d MiB", (peak-before)>>20)
	}
}
