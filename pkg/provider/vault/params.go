package vault

import (
	"fmt"
	"strings"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/volumepath"
)

// Class parameters. The first ones are those of hashicorp/vault-csi-provider,
// so its SecretProviderClasses carry over unchanged.
const (
	AddressParam       = "vaultAddress"
	RoleParam          = "roleName"
	AuthMountParam     = "vaultAuthMountPath"
	OldAuthMountParam  = "vaultKubernetesMountPath"
	AudienceParam      = "audience"
	NamespaceParam     = "vaultNamespace"
	CACertParam        = "vaultCACertPath"
	CADirParam         = "vaultCADirectory"
	TLSServerNameParam = "vaultTLSServerName"
	SkipTLSVerifyParam = "vaultSkipTLSVerify"
	ClientCertParam    = "vaultTLSClientCertPath"
	ClientKeyParam     = "vaultTLSClientKeyPath"
	ObjectsParam       = "objects"
	RenewBeforeParam   = "renewBefore"
	// TLSProfileParam names one of the admin's TLS profiles (ours).
	TLSProfileParam     = "vaultTLSProfile"
	csiProviderMetadata = "csi.storage.k8s.io/" // not ours: never reaches a provider
)

var known = map[string]bool{
	AddressParam: true, RoleParam: true, AuthMountParam: true, OldAuthMountParam: true, AudienceParam: true,
	NamespaceParam: true, CACertParam: true, CADirParam: true, TLSServerNameParam: true, SkipTLSVerifyParam: true,
	ClientCertParam: true, ClientKeyParam: true, ObjectsParam: true, RenewBeforeParam: true, TLSProfileParam: true,
}

// fileParams are vault-csi-provider's parameters that name files on the
// node. A class may not set them: the driver is privileged, and the files
// it would read (or present as its client certificate) are the node's.
var fileParams = []string{CACertParam, CADirParam, ClientCertParam, ClientKeyParam}

// Object is one entry of the "objects" parameter: a file named ObjectName
// holding SecretKey of the response to SecretPath.
type Object struct {
	ObjectName string         `json:"objectName"`
	SecretPath string         `json:"secretPath"`
	SecretKey  string         `json:"secretKey,omitempty"`
	Method     string         `json:"method,omitempty"`
	SecretArgs map[string]any `json:"secretArgs,omitempty"`
	Encoding   string         `json:"encoding,omitempty"`
	// FilePermission is accepted for compatibility; modes belong to the
	// class's files/fileMode parameters here.
	FilePermission any `json:"filePermission,omitempty"`
}

// classParams are the parsed class parameters.
type classParams struct {
	address, role, authMount, audience, namespace string
	serverName, tlsProfile                        string
	// fileParams and skipVerify are kept only to be refused by
	// checkClass: a class cannot choose trust material.
	files       []string
	skipVerify  string
	objects     []Object
	renewBefore time.Duration
}

func parseParams(p map[string]string) (classParams, error) {
	var c classParams
	for k := range p {
		if !known[k] && !strings.HasPrefix(k, csiProviderMetadata) {
			return c, fmt.Errorf("%w: unknown parameter %q for provider vault", provider.ErrInvalidParameters, k)
		}
	}
	c.address = strings.TrimRight(p[AddressParam], "/")
	c.role = p[RoleParam]
	c.authMount = p[AuthMountParam]
	if c.authMount == "" {
		c.authMount = p[OldAuthMountParam]
	}
	if c.authMount == "" {
		c.authMount = "kubernetes"
	}
	c.authMount = strings.Trim(strings.TrimPrefix(c.authMount, "auth/"), "/")
	if hasDotDot(c.authMount) {
		return c, fmt.Errorf("%w: %s: a mount path has no \"..\" (the login goes to auth/<mount>/login)", provider.ErrInvalidParameters, AuthMountParam)
	}
	c.audience = p[AudienceParam]
	c.namespace = p[NamespaceParam]
	c.serverName, c.tlsProfile, c.skipVerify = p[TLSServerNameParam], p[TLSProfileParam], p[SkipTLSVerifyParam]
	for _, k := range fileParams {
		if p[k] != "" {
			c.files = append(c.files, k)
		}
	}
	if v := p[RenewBeforeParam]; v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d < 0 {
			return c, fmt.Errorf("%w: %s %q is not a duration", provider.ErrInvalidParameters, RenewBeforeParam, v)
		}
		c.renewBefore = d
	}
	if c.role == "" {
		return c, fmt.Errorf("%w: %s is required", provider.ErrInvalidParameters, RoleParam)
	}
	if err := yaml.Unmarshal([]byte(p[ObjectsParam]), &c.objects); err != nil {
		return c, fmt.Errorf("%w: %s is not a YAML list of objects: %v", provider.ErrInvalidParameters, ObjectsParam, err)
	}
	if len(c.objects) == 0 {
		return c, fmt.Errorf("%w: %s lists no object", provider.ErrInvalidParameters, ObjectsParam)
	}
	seen := map[string]bool{}
	for i, o := range c.objects {
		switch {
		case o.ObjectName == "" || o.SecretPath == "":
			return c, fmt.Errorf("%w: objects[%d] needs objectName and secretPath", provider.ErrInvalidParameters, i)
		case hasDotDot(o.SecretPath):
			return c, fmt.Errorf("%w: objects[%d]: secretPath has a \"..\" segment", provider.ErrInvalidParameters, i)
		case volumepath.Check(o.ObjectName) != nil:
			// A file name: checked before the login, not after.
			return c, fmt.Errorf("%w: objects[%d]: %w", provider.ErrInvalidParameters, i, volumepath.Check(o.ObjectName))
		case seen[o.ObjectName]:
			return c, fmt.Errorf("%w: objectName %q is listed twice", provider.ErrInvalidParameters, o.ObjectName)
		case o.Method != "" && o.Method != "GET" && o.Method != "POST" && o.Method != "PUT":
			return c, fmt.Errorf("%w: objects[%d]: method %q is not GET, POST or PUT", provider.ErrInvalidParameters, i, o.Method)
		case o.Encoding != "" && o.Encoding != "utf-8" && o.Encoding != "base64" && o.Encoding != "hex":
			return c, fmt.Errorf("%w: objects[%d]: encoding %q is not utf-8, base64 or hex", provider.ErrInvalidParameters, i, o.Encoding)
		}
		seen[o.ObjectName] = true
	}
	return c, nil
}

// hasDotDot reports whether a Vault path has a ".." segment: the request
// would leave the mount or path the class appears to name.
func hasDotDot(p string) bool {
	for _, seg := range strings.Split(p, "/") {
		if seg == ".." {
			return true
		}
	}
	return false
}
