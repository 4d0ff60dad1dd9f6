package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/ephemeral-secrets/csi-driver/test/awstest"
	"github.com/ephemeral-secrets/csi-driver/test/harness"
)

// A rotation poll re-reads the secrets but mints no STS session while the
// one the pod holds has time left: its files stay byte for byte, and STS
// sees one AssumeRoleWithWebIdentity per poll (the read, with the pod's
// token) instead of one per session more. The manager still renews the
// session at its own point (1.5 % of its 1200 s here: about 18 s), and
// polls go on carrying the new one.
func TestAWSPollMintsNoSessionWhileItHasTimeLeft(t *testing.T) {
	ctx := context.Background()
	startAWS(t)
	counter, err := awstest.StartSTSCounter(minio.URL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(counter.Close)
	classes := fmt.Sprintf(`apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: aws-polled-session
  namespace: team-a
spec:
  provider: aws
  parameters:
    region: us-east-1
    roleArn: "%[1]s"
    stsEndpoint: "%[2]s"
    secretsManagerEndpoint: "%[3]s"
    rotationPollInterval: 1s
    objects: |
      - objectName: aws
        objectType: sts
        durationSeconds: 1200
      - objectName: "prod/polled-beside-session"
        objectType: secretsmanager
        objectAlias: token
`, minio.RoleARN, counter.URL, awsSecrets.URL())
	backends := fmt.Sprintf("aws:\n  region: us-east-1\n  endpoints: [%q, %q]\n", counter.URL, awsSecrets.URL())
	f := startFixtureOf(t, awsBin, classes, backends, "--renew-fraction", "0.015")
	awsSecrets.PutSecret("prod/polled-beside-session", "beside-session-v1")
	sessions := func() int { return counter.Calls("AssumeRoleWithWebIdentity", "1200") }
	reads := func() int { return counter.Calls("AssumeRoleWithWebIdentity", "900") }

	pod := awsPod(t, "aws-poll-session")
	target, err := f.kube.Publish(ctx, pod, dbVolume("aws-polled-session"))
	if err != nil {
		t.Fatalf("publish: %v", err)
	}
	first := loadCredentials(t, target)
	files := func() [3]string {
		var out [3]string
		for i, name := range []string{"aws", "aws.json", "aws.env"} {
			b, err := os.ReadFile(filepath.Join(target, name))
			if err != nil {
				t.Fatal(err)
			}
			out[i] = string(b)
		}
		return out
	}
	published := files()
	if n := sessions(); n != 1 {
		t.Fatalf("a publish minted %d sessions, want 1", n)
	}

	// Polls, one bringing a new value of the secret.
	harness.Eventually(t, 30*time.Second, "four polls", func() (bool, error) { return reads() >= 5, nil })
	awsSecrets.PutSecret("prod/polled-beside-session", "beside-session-v2")
	harness.Eventually(t, 10*time.Second, "the secret's new value reaches the pod", func() (bool, error) {
		return readSecret(t, target, "token") == "beside-session-v2", nil
	})
	if s, r := sessions(), reads(); s != 1 {
		t.Errorf("%d sessions minted over %d reads, want the published one only", s, r)
	}
	if files() != published {
		t.Errorf("the session files changed at a poll")
	}

	// The manager's own renewal of the session.
	harness.Eventually(t, 60*time.Second, "the session renewed before it ends", func() (bool, error) {
		return loadCredentials(t, target).AccessKeyID != first.AccessKeyID, nil
	})
	renewed, atRenewal := files(), reads()
	harness.Eventually(t, 30*time.Second, "two polls after the renewal", func() (bool, error) { return reads() >= atRenewal+2, nil })
	if s, r := sessions(), reads(); s < 2 || s >= r {
		t.Errorf("%d sessions minted over %d reads, want the renewal's and fewer than the reads", s, r)
	}
	if files() != renewed && sessions() == 2 {
		t.Errorf("the renewed session's files changed at a poll")
	}
	t.Logf("%d sessions minted over %d reads", sessions(), reads())
	if err := f.kube.Unpublish(ctx, pod, "db"); err != nil {
		t.Fatal(err)
	}
}
