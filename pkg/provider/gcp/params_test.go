package gcp

import (
	"errors"
	"os"
	"strings"
	"testing"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// The classes of GoogleCloudPlatform/secrets-store-csi-driver-provider-gcp's
// documented examples parse, and name their files as that provider does.
func TestParseProviderGCPParameters(t *testing.T) {
	c, err := parseParams(map[string]string{
		"auth": "pod-adc",
		"secrets": `
- resourceName: "projects/my-project/secrets/testsecret/versions/latest"
  path: "good1.txt"
- resourceName: "projects/my-project/secrets/testsecret/versions/latest"
  fileName: "good2.txt"
  extractJSONKey: "user"
- resourceName: "projects/my-project/locations/us-central1/secrets/testsecret/versions/3"
  fileName: "ignored.txt"
  path: "regional.txt"
  mode: 0400
`,
	})
	if err != nil {
		t.Fatal(err)
	}
	files := []string{c.secrets[0].file(), c.secrets[1].file(), c.secrets[2].file()}
	if strings.Join(files, ",") != "good1.txt,good2.txt,regional.txt" {
		t.Errorf("files %v", files)
	}
	if s := c.secrets[2]; s.project != "my-project" || s.location != "us-central1" || s.secret != "testsecret" || s.version != "3" || s.alias() {
		t.Errorf("regional secret parsed as %+v", s)
	}
	if !c.secrets[0].alias() || !c.hasAlias() {
		t.Error("latest is an alias")
	}
	if c.tokenFile != "access-token" || c.tokenJSONFile != "" || !c.givesToken() {
		t.Errorf("token files: %q %q", c.tokenFile, c.tokenJSONFile)
	}
	if c, err := parseParams(map[string]string{"accessTokenFile": "", "secrets": "- {resourceName: projects/123456/secrets/s/versions/1, path: a}"}); err != nil || c.givesToken() {
		t.Errorf("no token file: %v %+v", err, c)
	}
}

func TestParseParamsRejects(t *testing.T) {
	one := "- {resourceName: projects/my-project/secrets/s/versions/latest, path: a}"
	for name, p := range map[string]map[string]string{
		"unknown parameter":  {"secrets": one, "credentials": "{}"},
		"provider-adc":       {"secrets": one, "auth": "provider-adc"},
		"unknown auth":       {"secrets": one, "auth": "magic"},
		"nothing asked":      {"accessTokenFile": ""},
		"not YAML":           {"secrets": "{{"},
		"unknown field":      {"secrets": "- {resourceName: projects/my-project/secrets/s/versions/1, path: a, filePermission: 1}"},
		"no file":            {"secrets": "- {resourceName: projects/my-project/secrets/s/versions/1}"},
		"bad resource":       {"secrets": "- {resourceName: my-project/s, path: a}"},
		"host in resource":   {"secrets": "- {resourceName: 'projects/x/secrets/s/versions/1:access?x=@evil', path: a}"},
		"parameter manager":  {"secrets": "- {resourceName: projects/my-project/locations/global/parameters/p/versions/v, path: a}"},
		"dotdot path":        {"secrets": "- {resourceName: projects/my-project/secrets/s/versions/1, path: ../../etc/x}"},
		"dotdot file":        {"secrets": "- {resourceName: projects/my-project/secrets/s/versions/1, fileName: ..data}"},
		"absolute path":      {"secrets": "- {resourceName: projects/my-project/secrets/s/versions/1, path: /etc/x}"},
		"dotdot token file":  {"secrets": one, "accessTokenFile": "../token"},
		"twice":              {"secrets": one + "\n- {resourceName: projects/my-project/secrets/t/versions/1, path: a}"},
		"clash with token":   {"secrets": "- {resourceName: projects/my-project/secrets/s/versions/1, path: access-token}"},
		"both extract keys":  {"secrets": "- {resourceName: projects/my-project/secrets/s/versions/1, path: a, extractJSONKey: k, extractYAMLKey: k}"},
		"mode too high":      {"secrets": "- {resourceName: projects/my-project/secrets/s/versions/1, path: a, mode: 4095}"},
		"mode setuid":        {"secrets": "- {resourceName: projects/my-project/secrets/s/versions/1, path: a, mode: 04444}"},
		"mode executable":    {"secrets": "- {resourceName: projects/my-project/secrets/s/versions/1, path: a, mode: 0500}"},
		"mode other exec":    {"secrets": "- {resourceName: projects/my-project/secrets/s/versions/1, path: a, mode: 0441}"},
		"mode reads nothing": {"secrets": "- {resourceName: projects/my-project/secrets/s/versions/1, path: a, mode: 0200}"},
		"mode zero":          {"secrets": "- {resourceName: projects/my-project/secrets/s/versions/1, path: a, mode: 0}"},
		"mode negative":      {"secrets": "- {resourceName: projects/my-project/secrets/s/versions/1, path: a, mode: -1}"},
		"poll not duration":  {"secrets": one, "rotationPollInterval": "often"},
		"poll too short":     {"secrets": one, "rotationPollInterval": "10ms"},
		"too many secrets":   {"secrets": strings.Repeat("- {resourceName: projects/my-project/secrets/s/versions/1, path: a}\n", 65)},
		"project name short": {"secrets": "- {resourceName: projects/ab/secrets/s/versions/1, path: a}"},
	} {
		if _, err := parseParams(p); !errors.Is(err, provider.ErrInvalidParameters) {
			t.Errorf("%s: %v, want invalid parameters", name, err)
		}
	}
}

func TestNewChecksTheAdminsConfig(t *testing.T) {
	const aud = "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/k"
	p, err := New(Config{Audience: aud})
	if err != nil {
		t.Fatal(err)
	}
	if p.cfg.TokenAudience != "https:"+aud || p.cfg.STSEndpoint != DefaultSTSEndpoint || p.cfg.SecretManagerEndpoint != DefaultSecretManagerEndpoint ||
		p.cfg.TokenLifetimeSeconds != 600 || p.cfg.Scopes[0] != DefaultScope {
		t.Errorf("defaults: %+v", p.cfg)
	}
	for name, cfg := range map[string]Config{
		"no audience":          {},
		"audience of no pool":  {Audience: "sts.example"},
		"endpoint not a URL":   {Audience: aud, STSEndpoint: "sts.example:443"},
		"endpoint of a user":   {Audience: aud, Endpoints: []string{"https://u:p@sts.example"}},
		"tls of no endpoint":   {Audience: aud, TLS: map[string]provider.TLS{"https://elsewhere": {}}},
		"mapping key":          {Audience: aud, ServiceAccounts: map[string][]string{"team-a": {"a-sa1@p-1234.iam.gserviceaccount.com"}}},
		"mapping not an email": {Audience: aud, ServiceAccounts: map[string][]string{"team-a/app": {"root"}}},
		"lifetime too short":   {Audience: aud, TokenLifetimeSeconds: 10},
		"lifetime too long":    {Audience: aud, TokenLifetimeSeconds: 86400},
	} {
		if _, err := New(cfg); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestSecretManagerEndpoint(t *testing.T) {
	regional := Secret{location: "europe-west1"}
	for _, tc := range []struct {
		base string
		s    Secret
		want string
	}{
		{DefaultSecretManagerEndpoint, Secret{}, DefaultSecretManagerEndpoint},
		{DefaultSecretManagerEndpoint, regional, "https://secretmanager.europe-west1.rep.googleapis.com"},
		{"https://secretmanager.private.example", regional, "https://secretmanager.private.example"},
	} {
		if got := smEndpoint(tc.base, tc.s); got != tc.want {
			t.Errorf("smEndpoint(%s, %q) = %s, want %s", tc.base, tc.s.location, got, tc.want)
		}
	}
}

func TestExtract(t *testing.T) {
	for _, tc := range []struct {
		data string
		s    Secret
		want string
		ok   bool
	}{
		{`whole`, Secret{}, "whole", true},
		{`{"user":"u1","n":3}`, Secret{ExtractJSONKey: "user"}, "u1", true},
		{`{"user":"u1","n":3}`, Secret{ExtractJSONKey: "n"}, "3", true},
		{"user: u2\nport: 5432\n", Secret{ExtractYAMLKey: "user"}, "u2", true},
		{`{"user":"u1"}`, Secret{ExtractJSONKey: "password"}, "", false},
		{`not json`, Secret{ExtractJSONKey: "user"}, "", false},
	} {
		got, err := extract([]byte(tc.data), tc.s)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("extract(%q, %+v) = %q, %v", tc.data, tc.s, got, err)
		}
		if err != nil && strings.Contains(err.Error(), tc.data) {
			t.Errorf("the error quotes the value: %v", err)
		}
	}
}

func TestParseResource(t *testing.T) {
	for name, ok := range map[string]bool{
		"projects/my-project/secrets/s/versions/latest":                           true,
		"projects/123456789012/secrets/S_1-x/versions/7":                          true,
		"projects/my-project/locations/us-central1/secrets/s/versions/a":          true,
		"projects/my-project-/secrets/s/versions/1":                               false, // a hyphen last
		"projects/1project/secrets/s/versions/1":                                  false, // a digit first, not all digits
		"projects/my-project/locations/US/secrets/s/versions/1":                   false,
		"projects/my-project/locations/a.evil/secrets/s/versions/1":               false, // a host of its own
		"projects/my-project/secrets/s/versions/..":                               false,
		"projects/my-project/secrets/s/versions/1/extra":                          false,
		"projects/my-project/secrets/" + strings.Repeat("s", 256) + "/versions/1": false,
	} {
		if _, _, _, _, got := parseResource(name); got != ok {
			t.Errorf("parseResource(%q) ok = %v, want %v", name, got, ok)
		}
	}
	for email, ok := range map[string]bool{
		"app-reader@proj-a.iam.gserviceaccount.com":      true,
		"app@proj-a.iam.gserviceaccount.com":             false, // too short an ID
		"app-reader@proj-a.iam.gserviceaccount.com.evil": false,
		"app-reader@evil.example":                        false,
		"App-reader@proj-a.iam.gserviceaccount.com":      false,
	} {
		if got := validServiceAccount(email); got != ok {
			t.Errorf("validServiceAccount(%q) = %v, want %v", email, got, ok)
		}
	}
}

// A secret's mode, as the GCP provider's classes write it (YAML octal or
// decimal), keeps its read bits and loses its write bits: the files are
// read-only.
func TestSecretFileMode(t *testing.T) {
	for _, c := range []struct {
		yaml string
		want os.FileMode
		set  bool
	}{
		{"", 0, false},
		{", mode: 0400", 0o400, true},
		{", mode: 0440", 0o440, true},
		{", mode: 292", 0o444, true}, // decimal 292 is 0444
		{", mode: 0644", 0o444, true},
		{", mode: 0600", 0o400, true},
		{", mode: 0040", 0o040, true},
	} {
		p, err := parseParams(map[string]string{"secrets": "- {resourceName: projects/my-project/secrets/s/versions/1, path: a" + c.yaml + "}"})
		if err != nil {
			t.Errorf("%q: %v", c.yaml, err)
			continue
		}
		if m, ok := p.secrets[0].fileMode(); m != c.want || ok != c.set {
			t.Errorf("%q: mode %#o (set %v), want %#o (%v)", c.yaml, m, ok, c.want, c.set)
		}
	}
}
