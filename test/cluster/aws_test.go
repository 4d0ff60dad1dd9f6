package cluster

import (
	"context"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"testing"

	awssdk "github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ephemeral-secrets/csi-driver/test/awstest"
	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/kubelet"
)

// IRSA-style: the real API server is the OIDC issuer MinIO's STS trusts,
// and the pod's real TokenRequest token (audience sts.amazonaws.com) buys
// it an S3 session of its own.
func TestAWSSessionFromTheClustersOwnTokens(t *testing.T) {
	ctx := context.Background()
	// Anyone may read the issuer's discovery document and keys, as on EKS.
	if _, err := clients.RbacV1().ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{
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
	defer m.Close()
	harness.RegisterLog(m.LogFile)
	root := s3.New(s3.Options{Region: "us-east-1", BaseEndpoint: awssdk.String(m.URL), UsePathStyle: true,
		Credentials: credentials.NewStaticCredentialsProvider(awstest.RootUser, awstest.RootPassword, "")})
	if _, err := root.CreateBucket(ctx, &s3.CreateBucketInput{Bucket: awssdk.String("models")}); err != nil {
		t.Fatal(err)
	}
	if _, err := root.PutObject(ctx, &s3.PutObjectInput{Bucket: awssdk.String("models"), Key: awssdk.String("weights.txt"), Body: strings.NewReader("w=1")}); err != nil {
		t.Fatal(err)
	}

	uids := namespace(t, "team-aws", "trainer", "job", "wrong-aud")
	createClassOf(t, "team-aws", "session", "aws", map[string]any{
		"region": "us-east-1", "stsEndpoint": m.URL,
		"objects": fmt.Sprintf("- {objectName: aws, objectType: sts, roleArn: %q}\n", m.RoleARN),
	})
	f := setupWith(t, fmt.Sprintf("aws:\n  endpoints: [%q]\n", m.URL))
	tr := saToken(t, "team-aws", "trainer", "sts.amazonaws.com")
	pod := kubelet.Pod{Namespace: "team-aws", Name: "job", UID: uids["job"], ServiceAccount: "trainer",
		Tokens: map[string]string{"sts.amazonaws.com": tr}}
	target, err := f.kube.Publish(ctx, pod, volume("session"))
	if err != nil {
		t.Fatalf("publish: %v", err)
	}
	cfg, err := config.LoadDefaultConfig(ctx, config.WithRegion("us-east-1"),
		config.WithSharedCredentialsFiles([]string{filepath.Join(target, "aws")}), config.WithSharedConfigFiles(nil))
	if err != nil {
		t.Fatal(err)
	}
	creds, err := cfg.Credentials.Retrieve(ctx)
	if err != nil {
		t.Fatal(err)
	}
	harness.RememberSecret(creds.SecretAccessKey)
	harness.RememberSecret(creds.SessionToken)
	cl := s3.New(s3.Options{Region: "us-east-1", BaseEndpoint: awssdk.String(m.URL), UsePathStyle: true, Credentials: cfg.Credentials})
	obj, err := cl.GetObject(ctx, &s3.GetObjectInput{Bucket: awssdk.String("models"), Key: awssdk.String("weights.txt")})
	if err != nil {
		t.Fatalf("reading with the pod's session: %v", err)
	}
	body, _ := io.ReadAll(obj.Body)
	obj.Body.Close()
	if string(body) != "w=1" {
		t.Errorf("read %q", body)
	}
	if err := f.kube.Unpublish(ctx, pod, "db"); err != nil {
		t.Fatal(err)
	}

	// A cluster token for another audience buys nothing.
	other := saToken(t, "team-aws", "trainer", "vault")
	wrong := kubelet.Pod{Namespace: "team-aws", Name: "wrong-aud", UID: uids["wrong-aud"], ServiceAccount: "trainer",
		Tokens: map[string]string{"sts.amazonaws.com": other}}
	if _, err := f.kube.Publish(ctx, wrong, volume("session")); err == nil || !strings.Contains(err.Error(), "PermissionDenied") {
		t.Errorf("a token for another audience: %v, want PermissionDenied", err)
	}
}
