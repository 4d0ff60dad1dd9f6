package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	smithy "github.com/aws/smithy-go"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/ephemeral-secrets/csi-driver/test/awstest"
	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/kubelet"
)

var (
	awsOnce    sync.Once
	awsErr     error
	oidc       *awstest.OIDC
	minio      *awstest.MinIO
	awsSecrets *awstest.Secrets
)

// startAWS starts the OIDC issuer, MinIO (STS and S3) with a bucket, and
// the Secrets Manager/SSM server, once for the suite.
func startAWS(t *testing.T) {
	t.Helper()
	awsOnce.Do(func() {
		if oidc, awsErr = awstest.StartOIDC(); awsErr != nil {
			return
		}
		if minio, awsErr = awstest.StartMinIO(oidc.ConfigURL()); awsErr != nil {
			return
		}
		harness.RegisterLog(minio.LogFile)
		awsSecrets = awstest.StartSecrets()
		root := s3Client(credentials.NewStaticCredentialsProvider(awstest.RootUser, awstest.RootPassword, ""))
		ctx := context.Background()
		if _, awsErr = root.CreateBucket(ctx, &s3.CreateBucketInput{Bucket: aws.String("reports")}); awsErr != nil {
			return
		}
		_, awsErr = root.PutObject(ctx, &s3.PutObjectInput{Bucket: aws.String("reports"), Key: aws.String("q3.csv"), Body: strings.NewReader("quarter,revenue\nq3,42\n")})
	})
	if awsErr != nil {
		t.Fatal(awsErr)
	}
}

func s3Client(creds aws.CredentialsProvider) *s3.Client {
	return s3.New(s3.Options{Region: "us-east-1", Credentials: creds, BaseEndpoint: aws.String(minio.URL), UsePathStyle: true})
}

func awsClasses() string {
	return fmt.Sprintf(`apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: aws-session
  namespace: team-a
spec:
  provider: aws
  parameters:
    region: us-east-1
    stsEndpoint: "%[1]s"
    objects: |
      - objectName: aws
        objectType: sts
        roleArn: "%[2]s"
---
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: aws-secrets
  namespace: team-a
spec:
  provider: aws
  parameters:
    region: us-east-1
    roleArn: "%[2]s"
    stsEndpoint: "%[1]s"
    secretsManagerEndpoint: "%[3]s"
    ssmEndpoint: "%[3]s"
    objects: |
      - objectName: "prod/db"
        objectType: secretsmanager
        jmesPath:
          - path: username
            objectAlias: db-user
          - path: password
            objectAlias: db-pass
      - objectName: "/agents/openai-key"
        objectType: ssmparameter
        objectAlias: openai-key
        objectVersion: "1"
---
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: aws-polled
  namespace: team-a
spec:
  provider: aws
  parameters:
    region: us-east-1
    roleArn: "%[2]s"
    stsEndpoint: "%[1]s"
    secretsManagerEndpoint: "%[3]s"
    rotationPollInterval: 1s
    objects: |
      - objectName: "prod/rotating"
        objectType: secretsmanager
        objectAlias: token
---
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: aws-pinned
  namespace: team-a
spec:
  provider: aws
  parameters:
    region: us-east-1
    roleArn: "%[2]s"
    stsEndpoint: "%[1]s"
    secretsManagerEndpoint: "%[3]s"
    ssmEndpoint: "%[3]s"
    rotationPollInterval: 1s
    objects: |
      - objectName: "prod/polled-beside-pinned"
        objectType: secretsmanager
        objectAlias: token
      - objectName: "/agents/pinned-key"
        objectType: ssmparameter
        objectAlias: pinned-key
        objectVersion: "1"
---
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: aws-denied
  namespace: team-a
spec:
  provider: aws
  parameters:
    region: us-east-1
    roleArn: "%[2]s"
    stsEndpoint: "%[1]s"
    secretsManagerEndpoint: "%[3]s"
    objects: |
      - objectName: "prod/payroll"
        objectType: secretsmanager
---
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: aws-missing
  namespace: team-a
spec:
  provider: aws
  parameters:
    region: us-east-1
    roleArn: "%[2]s"
    stsEndpoint: "%[1]s"
    secretsManagerEndpoint: "%[3]s"
    objects: |
      - objectName: "prod/nothing"
        objectType: secretsmanager
`, minio.URL, minio.RoleARN, awsSecrets.URL())
}

func setupAWS(t *testing.T, extra ...string) *fixture {
	t.Helper()
	startAWS(t)
	backends := fmt.Sprintf("aws:\n  region: us-east-1\n  endpoints: [%q, %q]\n", minio.URL, awsSecrets.URL())
	return startFixtureOf(t, awsBin, awsClasses(), backends, extra...)
}

func awsPod(t *testing.T, name string) kubelet.Pod {
	t.Helper()
	p := kubelet.NewPod("team-a", name, "app")
	tok, err := oidc.Token("team-a", "app", "sts.amazonaws.com")
	if err != nil {
		t.Fatal(err)
	}
	harness.RememberSecret(tok)
	p.Tokens = map[string]string{"sts.amazonaws.com": tok}
	return p
}

// loadCredentials reads the volume's credentials file with the SDK's own
// shared-config loader, and remembers the secret parts.
func loadCredentials(t *testing.T, target string) aws.Credentials {
	t.Helper()
	cfg, err := config.LoadDefaultConfig(context.Background(), config.WithRegion("us-east-1"),
		config.WithSharedCredentialsFiles([]string{filepath.Join(target, "aws")}), config.WithSharedConfigFiles(nil))
	if err != nil {
		t.Fatal(err)
	}
	creds, err := cfg.Credentials.Retrieve(context.Background())
	if err != nil {
		t.Fatalf("the SDK cannot read the credentials file: %v", err)
	}
	harness.RememberSecret(creds.SecretAccessKey)
	harness.RememberSecret(creds.SessionToken)
	return creds
}

func TestAWSSessionCredentialsWorkAreReplacedAndGo(t *testing.T) {
	ctx := context.Background()
	// A 900 s session renewed at 1 % of its life: replaced within seconds.
	f := setupAWS(t, "--renew-fraction", "0.01")
	pod := awsPod(t, "aws-user")
	target, err := f.kube.Publish(ctx, pod, dbVolume("aws-session"))
	if err != nil {
		t.Fatalf("publish: %v", err)
	}
	creds := loadCredentials(t, target)
	for _, name := range []string{"aws.json", "aws.env"} {
		if b, err := os.ReadFile(filepath.Join(target, name)); err != nil || !bytes.Contains(b, []byte(creds.AccessKeyID)) {
			t.Errorf("%s does not hold the session: %v", name, err)
		}
	}
	cl := s3Client(credentials.NewStaticCredentialsProvider(creds.AccessKeyID, creds.SecretAccessKey, creds.SessionToken))
	obj, err := cl.GetObject(ctx, &s3.GetObjectInput{Bucket: aws.String("reports"), Key: aws.String("q3.csv")})
	if err != nil {
		t.Fatalf("reading an object the policy allows: %v", err)
	}
	body, _ := io.ReadAll(obj.Body)
	obj.Body.Close()
	if !strings.Contains(string(body), "q3,42") {
		t.Errorf("object read %q", body)
	}
	_, err = cl.PutObject(ctx, &s3.PutObjectInput{Bucket: aws.String("reports"), Key: aws.String("x"), Body: strings.NewReader("x")})
	var ae smithy.APIError
	if !errors.As(err, &ae) || ae.ErrorCode() != "AccessDenied" {
		t.Errorf("writing an object the policy does not allow: %v, want AccessDenied", err)
	}
	harness.Eventually(t, 30*time.Second, "credentials replaced before expiry", func() (bool, error) {
		return loadCredentials(t, target).AccessKeyID != creds.AccessKeyID, nil
	})
	if err := f.kube.Unpublish(ctx, pod, "db"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(target); !os.IsNotExist(err) {
		t.Errorf("files left after unpublish: %v", err)
	}
	harness.Eventually(t, 10*time.Second, "the audit says the session lives until it expires", func() (bool, error) {
		return strings.Contains(strings.Join(auditRecords(t, f.audit), " "), "revoke/unrevocable"), nil
	})
	// A token minted for another audience is refused by STS.
	other := kubelet.NewPod("team-a", "aws-wrong-aud", "app")
	tok, err := oidc.Token("team-a", "app", "vault")
	if err != nil {
		t.Fatal(err)
	}
	harness.RememberSecret(tok)
	other.Tokens = map[string]string{"sts.amazonaws.com": tok}
	if _, err := f.kube.Publish(ctx, other, dbVolume("aws-session")); status.Code(err) != codes.PermissionDenied {
		t.Errorf("a token for another audience: %v, want PermissionDenied", err)
	}
}

func TestAWSSecretsManagerAndSSMValues(t *testing.T) {
	ctx := context.Background()
	f := setupAWS(t)
	awsSecrets.PutSecret("prod/db", `{"username":"app","password":"sm-password-v1"}`)
	awsSecrets.PutParameter("/agents/openai-key", "ssm-openai-key-v1")
	awsSecrets.PutParameter("/agents/openai-key", "ssm-openai-key-v2")
	awsSecrets.Throttle(2) // the SDK retries these
	pod := awsPod(t, "aws-secrets")
	target, err := f.kube.Publish(ctx, pod, dbVolume("aws-secrets"))
	if err != nil {
		t.Fatalf("publish: %v", err)
	}
	for name, want := range map[string]string{
		"db-user": "app", "db-pass": "sm-password-v1", "openai-key": "ssm-openai-key-v1",
		"prod_db": `{"username":"app","password":"sm-password-v1"}`,
	} {
		got := readSecret(t, target, name)
		if got != want {
			t.Errorf("%s = %q, want %q", name, got, want)
		}
	}
	if err := f.kube.Unpublish(ctx, pod, "db"); err != nil {
		t.Fatal(err)
	}
	for class, code := range map[string]codes.Code{"aws-denied": codes.PermissionDenied, "aws-missing": codes.NotFound} {
		awsSecrets.Deny("prod/payroll")
		p := awsPod(t, "aws-"+class)
		if _, err := f.kube.Publish(ctx, p, dbVolume(class)); status.Code(err) != code {
			t.Errorf("%s: %v, want %s", class, err, code)
		}
	}
	awsSecrets.Throttle(100) // past the SDK's retries: Unavailable, and kubelet retries
	p := awsPod(t, "aws-throttled")
	if _, err := f.kube.Publish(ctx, p, dbVolume("aws-secrets")); status.Code(err) != codes.Unavailable {
		t.Errorf("throttled: %v, want Unavailable", err)
	}
	awsSecrets.Throttle(0)
}

func TestAWSSecretsAreReReadAndSwappedOnlyWhenChanged(t *testing.T) {
	ctx := context.Background()
	f := setupAWS(t)
	awsSecrets.PutSecret("prod/rotating", "rotating-secret-v1")
	pod := awsPod(t, "aws-poll")
	target, err := f.kube.Publish(ctx, pod, dbVolume("aws-polled"))
	if err != nil {
		t.Fatalf("publish: %v", err)
	}
	if got := readSecret(t, target, "token"); got != "rotating-secret-v1" {
		t.Fatalf("token = %q", got)
	}
	version := func() string {
		l, err := os.Readlink(filepath.Join(target, "..data"))
		if err != nil {
			t.Fatal(err)
		}
		return l
	}
	first, reads := version(), awsSecrets.Requests()
	time.Sleep(3500 * time.Millisecond) // three polls
	if awsSecrets.Requests() <= reads {
		t.Fatalf("no re-read in three poll intervals")
	}
	if version() != first {
		t.Errorf("files were swapped although the secret did not change")
	}
	awsSecrets.PutSecret("prod/rotating", "rotating-secret-v2")
	harness.Eventually(t, 10*time.Second, "the new version reaches the pod", func() (bool, error) {
		return readSecret(t, target, "token") == "rotating-secret-v2", nil
	})
	if err := f.kube.Unpublish(ctx, pod, "db"); err != nil {
		t.Fatal(err)
	}
}

// A re-issue (each rotation poll) reads a pinned version (objectVersion)
// no more: its value is carried over from the lease it replaces. Reading
// it is then refused, and the poll still brings the other object's new
// value; were the pinned one read again, every poll would fail.
func TestAWSPinnedVersionsAreNotReReadAtEachPoll(t *testing.T) {
	ctx := context.Background()
	f := setupAWS(t)
	awsSecrets.PutParameter("/agents/pinned-key", "pinned-key-v1")
	awsSecrets.PutParameter("/agents/pinned-key", "pinned-key-v2")
	awsSecrets.PutSecret("prod/polled-beside-pinned", "polled-v1")
	pod := awsPod(t, "aws-pinned")
	target, err := f.kube.Publish(ctx, pod, dbVolume("aws-pinned"))
	if err != nil {
		t.Fatalf("publish: %v", err)
	}
	if got := readSecret(t, target, "pinned-key"); got != "pinned-key-v1" {
		t.Fatalf("pinned-key = %q, want version 1", got)
	}
	awsSecrets.Deny("/agents/pinned-key")
	awsSecrets.PutSecret("prod/polled-beside-pinned", "polled-v2")
	harness.Eventually(t, 10*time.Second, "the polled object's new version reaches the pod", func() (bool, error) {
		return readSecret(t, target, "token") == "polled-v2", nil
	})
	if got := readSecret(t, target, "pinned-key"); got != "pinned-key-v1" {
		t.Errorf("pinned-key = %q after polls, want version 1", got)
	}
	if err := f.kube.Unpublish(ctx, pod, "db"); err != nil {
		t.Fatal(err)
	}
}
