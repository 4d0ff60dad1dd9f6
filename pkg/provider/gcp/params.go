package gcp

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/volumepath"
)

// Class parameters: those of GoogleCloudPlatform's
// secrets-store-csi-driver-provider-gcp (secrets, auth), and ours for the
// pod's access token, endpoints and rotation.
const (
	SecretsParam = "secrets"
	// AuthParam is accepted for classes written for the GCP provider:
	// empty or "pod-adc" (the pod's own identity, the only one here).
	AuthParam = "auth"
	// AudienceParam, when given, must be the admin's (Config.Audience).
	AudienceParam = "audience"
	// ServiceAccountParam names the Google service account to
	// impersonate: one the admin maps to the pod's namespace and service
	// account. Default: the only one mapped, or none (the federated token).
	ServiceAccountParam     = "serviceAccount"
	STSEndpointParam        = "stsEndpoint"
	IAMCredentialsEndpoint  = "iamCredentialsEndpoint"
	SecretManagerEndpoint   = "secretManagerEndpoint"
	AccessTokenFileParam    = "accessTokenFile"     // default "access-token"; empty: no token file
	AccessTokenJSONParam    = "accessTokenJSONFile" // a JSON file with the token and its expiry; default none
	RotationPollParam       = "rotationPollInterval"
	defaultAccessTokenFile  = "access-token"
	maxSecretsPerClass      = 64
	maxRotationPollInterval = 24 * time.Hour
)

var known = map[string]bool{
	SecretsParam: true, AuthParam: true, AudienceParam: true, ServiceAccountParam: true,
	STSEndpointParam: true, IAMCredentialsEndpoint: true, SecretManagerEndpoint: true,
	AccessTokenFileParam: true, AccessTokenJSONParam: true, RotationPollParam: true,
}

// Secret is one entry of the "secrets" parameter, as the GCP provider
// documents it.
type Secret struct {
	// ResourceName is a secret version:
	// projects/P/secrets/S/versions/V or, for a regional secret,
	// projects/P/locations/L/secrets/S/versions/V. V is a number, "latest"
	// or an alias.
	ResourceName string `json:"resourceName"`
	// FileName and Path both name the file; Path wins where both are set.
	FileName string `json:"fileName,omitempty"`
	Path     string `json:"path,omitempty"`
	// ExtractJSONKey and ExtractYAMLKey write one top-level key of a JSON
	// or YAML secret instead of the whole value.
	ExtractJSONKey string `json:"extractJSONKey,omitempty"`
	ExtractYAMLKey string `json:"extractYAMLKey,omitempty"`
	// Mode is the file's mode (default: the class's fileMode, else
	// 0440). Files here are read-only and never executable: write bits are
	// dropped (the volume is mounted read-only; Google's own secret
	// volumes drop them too), an execute bit or a mode that reads nothing
	// is refused.
	Mode *int32 `json:"mode,omitempty"`

	project, location, secret, version string
}

// file is where the secret's value goes.
func (s Secret) file() string {
	if s.Path != "" {
		return s.Path
	}
	return s.FileName
}

// fileMode is the mode the class asks for the secret's file, write bits
// dropped, and whether it asks for one.
func (s Secret) fileMode() (os.FileMode, bool) {
	if s.Mode == nil {
		return 0, false
	}
	return os.FileMode(*s.Mode) &^ 0o222, true
}

// alias reports whether the version is an alias ("latest" or a name)
// rather than a fixed version number: a rotation poll may find a new
// value behind it.
func (s Secret) alias() bool {
	_, err := strconv.ParseUint(s.version, 10, 64)
	return err != nil
}

// Secret Manager's resource names (its REST reference): project IDs are
// 6-30 lower-case letters, digits and hyphens, starting with a letter;
// project numbers digits; locations lower-case host labels; secret IDs
// letters, digits, underscores and hyphens (at most 255); versions a
// number, "latest" or an alias. Checked by hand: the regular expression
// with these bounded repetitions compiles to some 400 KB of heap that
// every driver process would keep.
func parseResource(name string) (project, location, secret, version string, ok bool) {
	parts := strings.Split(name, "/")
	switch {
	case len(parts) == 6 && parts[0] == "projects" && parts[2] == "secrets" && parts[4] == "versions":
		project, secret, version = parts[1], parts[3], parts[5]
	case len(parts) == 8 && parts[0] == "projects" && parts[2] == "locations" && parts[4] == "secrets" && parts[6] == "versions":
		project, location, secret, version = parts[1], parts[3], parts[5], parts[7]
		if !validLocation(location) {
			return "", "", "", "", false
		}
	default:
		return "", "", "", "", false
	}
	ok = (validID(project, 6, 30) || only(project, 1, 20, isDigit)) && only(secret, 1, 255, isIDChar) && only(version, 1, 63, isIDChar)
	return project, location, secret, version, ok
}

func isDigit(c byte) bool  { return c >= '0' && c <= '9' }
func isLower(c byte) bool  { return c >= 'a' && c <= 'z' }
func isLabel(c byte) bool  { return isLower(c) || isDigit(c) || c == '-' }
func isIDChar(c byte) bool { return isLabel(c) || c >= 'A' && c <= 'Z' || c == '_' }

// only reports whether s has min to max bytes, each allowed.
func only(s string, minLen, maxLen int, allowed func(byte) bool) bool {
	if len(s) < minLen || len(s) > maxLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		if !allowed(s[i]) {
			return false
		}
	}
	return true
}

// validID is a Google Cloud ID (a project's, a service account's):
// lower-case letters, digits and hyphens, a letter first, no hyphen last.
func validID(s string, minLen, maxLen int) bool {
	return only(s, minLen, maxLen, isLabel) && isLower(s[0]) && s[len(s)-1] != '-'
}

// validLocation is a location (a region), which becomes a host label of
// Google's regional endpoints.
func validLocation(s string) bool { return only(s, 1, 63, isLabel) && isLower(s[0]) }

type classParams struct {
	audience, serviceAccount             string
	stsEndpoint, iamEndpoint, smEndpoint string
	tokenFile, tokenJSONFile             string
	rotationPoll                         time.Duration
	secrets                              []Secret
}

// hasAlias reports whether any secret names a version alias.
func (c classParams) hasAlias() bool {
	for _, s := range c.secrets {
		if s.alias() {
			return true
		}
	}
	return false
}

// modes are the modes the class asks for its secrets' files, by file
// (provider.Lease.Modes); nil where it asks for none.
func (c classParams) modes() map[string]os.FileMode {
	var m map[string]os.FileMode
	for _, s := range c.secrets {
		if mode, ok := s.fileMode(); ok {
			if m == nil {
				m = map[string]os.FileMode{}
			}
			m[s.file()] = mode
		}
	}
	return m
}

// givesToken reports whether the pod gets the access token in a file.
func (c classParams) givesToken() bool { return c.tokenFile != "" || c.tokenJSONFile != "" }

// parseParams reads and checks the class parameters. It needs nothing of
// the admin's configuration: what the admin allows is checked after.
func parseParams(p map[string]string) (classParams, error) {
	var c classParams
	for k := range p {
		if !known[k] && !strings.HasPrefix(k, "csi.storage.k8s.io/") {
			return c, fmt.Errorf("%w: unknown parameter %q for provider gcp", provider.ErrInvalidParameters, k)
		}
	}
	switch p[AuthParam] {
	case "", "pod-adc":
	case "provider-adc":
		return c, fmt.Errorf("%w: %s: provider-adc (the node's identity) is not offered: secrets are read with the pod's own identity", provider.ErrInvalidParameters, AuthParam)
	default:
		return c, fmt.Errorf("%w: %s must be pod-adc", provider.ErrInvalidParameters, AuthParam)
	}
	c.audience, c.serviceAccount = p[AudienceParam], p[ServiceAccountParam]
	c.stsEndpoint, c.iamEndpoint, c.smEndpoint = p[STSEndpointParam], p[IAMCredentialsEndpoint], p[SecretManagerEndpoint]
	c.tokenFile = defaultAccessTokenFile
	if v, ok := p[AccessTokenFileParam]; ok {
		c.tokenFile = v
	}
	c.tokenJSONFile = p[AccessTokenJSONParam]
	if v := p[RotationPollParam]; v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d < time.Second || d > maxRotationPollInterval {
			return c, fmt.Errorf("%w: %s %q is not a duration from 1s to 24h", provider.ErrInvalidParameters, RotationPollParam, v)
		}
		c.rotationPoll = d
	}
	if v, ok := p[SecretsParam]; ok {
		if err := yaml.UnmarshalStrict([]byte(v), &c.secrets); err != nil {
			return c, fmt.Errorf("%w: %s is not a YAML list of secrets (resourceName, fileName or path, mode, extractJSONKey, extractYAMLKey)", provider.ErrInvalidParameters, SecretsParam)
		}
	}
	if len(c.secrets) == 0 && !c.givesToken() {
		return c, fmt.Errorf("%w: the class asks for no secret and no access token file", provider.ErrInvalidParameters)
	}
	if len(c.secrets) > maxSecretsPerClass {
		return c, fmt.Errorf("%w: %s lists more than %d secrets", provider.ErrInvalidParameters, SecretsParam, maxSecretsPerClass)
	}
	files := map[string]bool{}
	claim := func(name string) error {
		if files[name] {
			return fmt.Errorf("%w: file %q would be written twice", provider.ErrInvalidParameters, name)
		}
		// Checked before any call: nothing is minted for a file that
		// cannot be written.
		if err := volumepath.Check(name); err != nil {
			return fmt.Errorf("%w: %w", provider.ErrInvalidParameters, err)
		}
		files[name] = true
		return nil
	}
	for _, f := range []string{c.tokenFile, c.tokenJSONFile} {
		if f != "" {
			if err := claim(f); err != nil {
				return c, err
			}
		}
	}
	for i := range c.secrets {
		s := &c.secrets[i]
		var ok bool
		if s.project, s.location, s.secret, s.version, ok = parseResource(s.ResourceName); !ok {
			if strings.Contains(s.ResourceName, "/parameters/") {
				return c, fmt.Errorf("%w: secrets[%d]: Parameter Manager resources are not supported", provider.ErrInvalidParameters, i)
			}
			return c, fmt.Errorf("%w: secrets[%d]: resourceName %q is not projects/P/[locations/L/]secrets/S/versions/V", provider.ErrInvalidParameters, i, s.ResourceName)
		}
		if s.file() == "" {
			return c, fmt.Errorf("%w: secrets[%d] (%s) has no fileName or path", provider.ErrInvalidParameters, i, s.ResourceName)
		}
		if s.ExtractJSONKey != "" && s.ExtractYAMLKey != "" {
			return c, fmt.Errorf("%w: secrets[%d]: extractJSONKey and extractYAMLKey exclude each other", provider.ErrInvalidParameters, i)
		}
		if m := s.Mode; m != nil {
			switch {
			case *m < 0 || *m > 0o777:
				return c, fmt.Errorf("%w: secrets[%d]: mode must be 0 to 0777", provider.ErrInvalidParameters, i)
			case *m&0o111 != 0:
				return c, fmt.Errorf("%w: secrets[%d]: mode %#o has an execute bit: files are never executable here", provider.ErrInvalidParameters, i, *m)
			case *m&0o444 == 0:
				return c, fmt.Errorf("%w: secrets[%d]: mode %#o lets nobody read the file", provider.ErrInvalidParameters, i, *m)
			}
		}
		if err := claim(s.file()); err != nil {
			return c, err
		}
	}
	return c, nil
}
