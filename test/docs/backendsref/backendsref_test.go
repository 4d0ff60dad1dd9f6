package backendsref

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const root = "../../.."

// TestReferenceIsCurrent: docs/backends.md is what the types say today.
func TestReferenceIsCurrent(t *testing.T) {
	want, err := Generate(root)
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(filepath.Join(root, Output))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("%s is stale: run make docs (and commit it)", Output)
	}
}

// A module whose configuration has a key without a doc comment, or a
// type the reference cannot describe, gets no reference.
func TestRefusesWhatItCannotDescribe(t *testing.T) {
	for name, src := range map[string]string{
		"undocumented": "type backendConfig struct {\n\t// A is documented.\n\tA string `json:\"a\"`\n\tB int `json:\"b\"`\n}\n",
		"foreign type": "import \"time\"\n\n// X.\ntype backendConfig struct {\n\t// T is documented.\n\tT time.Time `json:\"t\"`\n}\n",
		"missing":      "type other struct{}\n",
	} {
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, "go.mod"), []byte("module example.com/m\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(filepath.Join(dir, EntryDir), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, EntryDir, "c.go"), []byte("package cli\n\n"+src), 0o644); err != nil {
			t.Fatal(err)
		}
		if _, err := Generate(dir); err == nil {
			t.Errorf("%s: generated", name)
		} else if name == "undocumented" && !strings.Contains(err.Error(), `(key "b") has no doc comment`) {
			t.Errorf("%s: %v", name, err)
		}
	}
}
