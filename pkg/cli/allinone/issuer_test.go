package allinone

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The issuer's configuration: the postgres section is required, and no
// error quotes the file (it holds the admin credential).
func TestReadIssuerConfig(t *testing.T) {
	const secret = "s3cret-admin-pw"
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	if _, err := readIssuerConfig(write("ok.yaml", strings.Replace(checkPG, checkSecret, secret, 1))); err != nil {
		t.Fatalf("a postgres section: %v", err)
	}
	for name, content := range map[string]string{
		"no-postgres.yaml": "vault:\n  addresses: [https://vault:8200]\n",
		"bad.yaml":         "postgres:\n  connections:\n    main:\n      url: postgres://admin:" + secret + "@db/postgres\n      rolez: {}\n",
		"not-yaml.yaml":    "postgres: [" + secret,
	} {
		_, err := readIssuerConfig(write(name, content))
		if err == nil {
			t.Errorf("%s: accepted", name)
		} else if strings.Contains(err.Error(), secret) {
			t.Errorf("%s: the error quotes the file: %v", name, err)
		}
	}
	if _, err := readIssuerConfig(""); err == nil {
		t.Error("no file: accepted")
	}
}
