package aws

import (
	"errors"
	"strings"
	"testing"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// The parameters of aws/secrets-store-csi-driver-provider-aws's documented
// examples parse, and name their files as that provider does.
func TestParseProviderAWSParameters(t *testing.T) {
	c, err := parseParams(map[string]string{
		"region":         "us-east-1",
		"failoverRegion": "us-east-2",
		"roleArn":        "arn:aws:iam::111122223333:role/app",
		"objects": `
- objectName: "MySecret"
  objectType: "secretsmanager"
  jmesPath:
    - path: username
      objectAlias: dbusername
    - path: password
      objectAlias: dbpassword
- objectName: "arn:aws:secretsmanager:us-east-1:111122223333:secret:MySecret2-d4e5f6"
  objectAlias: "secret2"
- objectName: "/my/parameter"
  objectType: "ssmparameter"
  objectVersionLabel: "current"
- objectName: "session"
  objectType: "sts"
`,
	}, "")
	if err != nil {
		t.Fatal(err)
	}
	if c.objects[1].ObjectType != TypeSecretsManager || c.objects[1].fileName() != "secret2" {
		t.Errorf("ARN object: %+v", c.objects[1])
	}
	if c.objects[2].fileName() != "_my_parameter" {
		t.Errorf("ssm file name %q", c.objects[2].fileName())
	}
	if s := c.objects[3]; s.DurationSeconds != 900 || s.RoleArn != c.roleArn || s.AssumeWith != "webIdentity" {
		t.Errorf("sts defaults: %+v", s)
	}
	if c.audience != "" || !c.hasSTS() || !c.hasSecrets() {
		t.Errorf("%+v", c)
	}
}

func TestParseParamsRejects(t *testing.T) {
	for name, p := range map[string]map[string]string{
		"no region":     {"objects": `- {objectName: a, objectType: secretsmanager}`},
		"no objects":    {"region": "r"},
		"host region":   {"region": "127.0.0.1:8080/#", "objects": `- {objectName: a, objectType: secretsmanager}`},
		"host failover": {"region": "r", "failoverRegion": "evil.example.com", "objects": `- {objectName: a, objectType: secretsmanager}`},
		"unknown param": {"region": "r", "objects": `- {objectName: a, objectType: secretsmanager}`, "accessKey": "AKIA"},
		"bad type":      {"region": "r", "objects": `- {objectName: a, objectType: s3}`},
		"both versions": {"region": "r", "objects": `- {objectName: a, objectType: ssmparameter, objectVersion: "1", objectVersionLabel: x}`},
		"clash":         {"region": "r", "objects": "- {objectName: a, objectType: secretsmanager}\n- {objectName: b, objectType: ssmparameter, objectAlias: a}"},
		"sts no role":   {"region": "r", "objects": `- {objectName: s, objectType: sts}`},
		"sts too short": {"region": "r", "objects": `- {objectName: s, objectType: sts, roleArn: r, durationSeconds: 60}`},
		"sts bad with":  {"region": "r", "objects": `- {objectName: s, objectType: sts, roleArn: r, assumeWith: magic}`},
		"jmes no alias": {"region": "r", "objects": `- {objectName: a, objectType: secretsmanager, jmesPath: [{path: x}]}`},
	} {
		if _, err := parseParams(p, ""); !errors.Is(err, provider.ErrInvalidParameters) {
			t.Errorf("%s: %v", name, err)
		}
	}
}

func TestEndpointsAreTheAdminsOnly(t *testing.T) {
	p, err := New(Config{Endpoints: []string{"http://127.0.0.1:9000/"}})
	if err != nil {
		t.Fatal(err)
	}
	if e, err := p.endpoint("http://127.0.0.1:9000"); err != nil || *e != "http://127.0.0.1:9000" {
		t.Errorf("listed endpoint: %v", err)
	}
	if _, err := p.endpoint("https://sts.attacker.example"); !errors.Is(err, provider.ErrPermissionDenied) {
		t.Errorf("unlisted endpoint: %v", err)
	}
	if _, err := New(Config{Endpoints: []string{"ftp://x"}}); err == nil || !strings.Contains(err.Error(), "http") {
		t.Errorf("bad endpoint accepted: %v", err)
	}
}
