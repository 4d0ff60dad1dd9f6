package aws

import (
	"fmt"
	"strings"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/volumepath"
)

// Class parameters: those of aws/secrets-store-csi-driver-provider-aws
// (region, failoverRegion, objects), and ours for temporary credentials
// and endpoints.
const (
	RegionParam         = "region"
	FailoverRegionParam = "failoverRegion"
	ObjectsParam        = "objects"
	RoleArnParam        = "roleArn"  // the role the pod's token assumes to read secrets
	AudienceParam       = "audience" // of the pod's token: empty, or the admin's (Config.Audience)
	STSEndpointParam    = "stsEndpoint"
	SMEndpointParam     = "secretsManagerEndpoint"
	SSMEndpointParam    = "ssmEndpoint"
	// RotationPollParam: how often Secrets Manager and SSM values are read
	// again while the pod runs (ours; off by default). Files change only
	// when a value did.
	RotationPollParam = "rotationPollInterval"
)

// Object types.
const (
	TypeSecretsManager = "secretsmanager"
	TypeSSMParameter   = "ssmparameter"
	TypeSTS            = "sts"
)

// Object is one entry of the "objects" parameter.
type Object struct {
	ObjectName         string    `json:"objectName"`
	ObjectType         string    `json:"objectType,omitempty"`
	ObjectAlias        string    `json:"objectAlias,omitempty"`
	ObjectVersion      string    `json:"objectVersion,omitempty"`
	ObjectVersionLabel string    `json:"objectVersionLabel,omitempty"`
	JMESPath           []JMESRef `json:"jmesPath,omitempty"`
	// FilePermission is accepted for compatibility; modes belong to the
	// class's files/fileMode parameters here.
	FilePermission string `json:"filePermission,omitempty"`

	// objectType sts: temporary credentials for the pod.
	RoleArn         string            `json:"roleArn,omitempty"`
	DurationSeconds int32             `json:"durationSeconds,omitempty"`
	SessionPolicy   string            `json:"sessionPolicy,omitempty"`
	SessionTags     map[string]string `json:"sessionTags,omitempty"`
	// AssumeWith is "webIdentity" (the pod's token; the default) or "node"
	// (the node's own credentials, where the admin allows it).
	AssumeWith string `json:"assumeWith,omitempty"`
}

// JMESRef writes one JSON field of a secret to a file of its own.
type JMESRef struct {
	Path        string `json:"path"`
	ObjectAlias string `json:"objectAlias"`
}

type classParams struct {
	region, failoverRegion, roleArn, audience string
	stsEndpoint, smEndpoint, ssmEndpoint      string
	rotationPoll                              time.Duration
	objects                                   []Object
}

func (c classParams) hasSecrets() bool {
	for _, o := range c.objects {
		if o.ObjectType != TypeSTS {
			return true
		}
	}
	return false
}

func (c classParams) hasSTS() bool {
	for _, o := range c.objects {
		if o.ObjectType == TypeSTS {
			return true
		}
	}
	return false
}

var known = map[string]bool{
	RegionParam: true, FailoverRegionParam: true, ObjectsParam: true, RoleArnParam: true, AudienceParam: true,
	STSEndpointParam: true, SMEndpointParam: true, SSMEndpointParam: true, RotationPollParam: true,
}

func parseParams(p map[string]string, defaultRegion string) (classParams, error) {
	var c classParams
	for k := range p {
		if !known[k] && !strings.HasPrefix(k, "csi.storage.k8s.io/") {
			return c, fmt.Errorf("%w: unknown parameter %q for provider aws", provider.ErrInvalidParameters, k)
		}
	}
	c.region, c.failoverRegion, c.roleArn = p[RegionParam], p[FailoverRegionParam], p[RoleArnParam]
	if c.region == "" {
		c.region = defaultRegion
	}
	if c.region == "" {
		return c, fmt.Errorf("%w: %s is required", provider.ErrInvalidParameters, RegionParam)
	}
	// Regions become host names of AWS's endpoints: a class must not be
	// able to make one up ("127.0.0.1:8080/#").
	for _, r := range []struct{ key, v string }{{RegionParam, c.region}, {FailoverRegionParam, c.failoverRegion}} {
		if !validRegion(r.v) && (r.v != "" || r.key == RegionParam) {
			return c, fmt.Errorf("%w: %s %q is not a region name", provider.ErrInvalidParameters, r.key, r.v)
		}
	}
	c.audience = p[AudienceParam] // must be the admin's: checked by the provider
	c.stsEndpoint, c.smEndpoint, c.ssmEndpoint = p[STSEndpointParam], p[SMEndpointParam], p[SSMEndpointParam]
	if v := p[RotationPollParam]; v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d < time.Second {
			return c, fmt.Errorf("%w: %s %q is not a duration of at least 1s", provider.ErrInvalidParameters, RotationPollParam, v)
		}
		c.rotationPoll = d
	}
	if err := yaml.Unmarshal([]byte(p[ObjectsParam]), &c.objects); err != nil {
		return c, fmt.Errorf("%w: %s is not a YAML list of objects: %v", provider.ErrInvalidParameters, ObjectsParam, err)
	}
	if len(c.objects) == 0 {
		return c, fmt.Errorf("%w: %s lists no object", provider.ErrInvalidParameters, ObjectsParam)
	}
	names := map[string]bool{}
	claim := func(name string) error {
		if names[name] {
			return fmt.Errorf("%w: file %q would be written twice", provider.ErrInvalidParameters, name)
		}
		// Checked here, before any AWS call: an STS session minted for a
		// file that cannot be written could not be revoked.
		if err := volumepath.Check(name); err != nil {
			return fmt.Errorf("%w: %w", provider.ErrInvalidParameters, err)
		}
		names[name] = true
		return nil
	}
	for i := range c.objects {
		o := &c.objects[i]
		if o.ObjectName == "" {
			return c, fmt.Errorf("%w: objects[%d] has no objectName", provider.ErrInvalidParameters, i)
		}
		if o.ObjectType == "" {
			if strings.HasPrefix(o.ObjectName, "arn:") {
				o.ObjectType = arnType(o.ObjectName)
			}
		}
		switch o.ObjectType {
		case TypeSecretsManager, TypeSSMParameter:
			if o.ObjectVersion != "" && o.ObjectVersionLabel != "" {
				return c, fmt.Errorf("%w: %s: objectVersion and objectVersionLabel exclude each other", provider.ErrInvalidParameters, o.ObjectName)
			}
			if err := claim(o.fileName()); err != nil {
				return c, err
			}
			for _, j := range o.JMESPath {
				if j.Path == "" || j.ObjectAlias == "" {
					return c, fmt.Errorf("%w: %s: jmesPath entries need path and objectAlias", provider.ErrInvalidParameters, o.ObjectName)
				}
				if err := claim(j.ObjectAlias); err != nil {
					return c, err
				}
			}
		case TypeSTS:
			if o.RoleArn == "" {
				o.RoleArn = c.roleArn
			}
			if o.RoleArn == "" {
				return c, fmt.Errorf("%w: %s: an sts object needs roleArn", provider.ErrInvalidParameters, o.ObjectName)
			}
			if o.DurationSeconds == 0 {
				o.DurationSeconds = 900 // the shortest STS allows
			}
			if o.DurationSeconds < 900 || o.DurationSeconds > 43200 {
				return c, fmt.Errorf("%w: %s: durationSeconds must be 900 to 43200", provider.ErrInvalidParameters, o.ObjectName)
			}
			if o.AssumeWith == "" {
				o.AssumeWith = "webIdentity"
			}
			if o.AssumeWith != "webIdentity" && o.AssumeWith != "node" {
				return c, fmt.Errorf("%w: %s: assumeWith is webIdentity or node", provider.ErrInvalidParameters, o.ObjectName)
			}
			for _, n := range sessionFiles(o.ObjectName) {
				if err := claim(n); err != nil {
					return c, err
				}
			}
		default:
			return c, fmt.Errorf("%w: %s: objectType must be secretsmanager, ssmparameter or sts", provider.ErrInvalidParameters, o.ObjectName)
		}
	}
	return c, nil
}

// validRegion reports whether s looks like an AWS region name: a host
// label of lower-case letters, digits and dashes.
func validRegion(s string) bool {
	if s == "" || len(s) > 63 || s[0] == '-' || s[len(s)-1] == '-' {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return false
		}
	}
	return true
}

// sessionFiles are the files of an sts object's session (see
// addCredentialFiles).
func sessionFiles(name string) []string { return []string{name, name + ".json", name + ".env"} }

// fileName is where an object's value goes: its alias, or its name with
// slashes made underscores (as the AWS provider does).
func (o Object) fileName() string {
	if o.ObjectAlias != "" {
		return o.ObjectAlias
	}
	return strings.ReplaceAll(o.ObjectName, "/", "_")
}

func arnType(arn string) string {
	switch {
	case strings.Contains(arn, ":secretsmanager:"):
		return TypeSecretsManager
	case strings.Contains(arn, ":ssm:"):
		return TypeSSMParameter
	}
	return ""
}
