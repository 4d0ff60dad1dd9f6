package v1alpha1_test

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestGeneratedFilesAreCurrent runs controller-gen (the version and
// arguments of "make generate") into a temporary directory and compares
// its output with the committed deep-copy functions and CRD (in the
// directory "make generate" writes it to, the chart's files/crds/): a
// type changed without "make generate" fails here.
func TestGeneratedFilesAreCurrent(t *testing.T) {
	root, err := filepath.Abs("../../../..")
	if err != nil {
		t.Fatal(err)
	}
	printed := func(target string) string {
		t.Helper()
		out, err := exec.Command("make", "-s", "-C", root, target).Output()
		if err != nil {
			t.Fatalf("make %s: %v", target, err)
		}
		return strings.TrimSpace(string(out))
	}
	args := strings.Fields(printed("print-controller-gen"))
	if len(args) < 2 {
		t.Fatalf("make print-controller-gen printed %q", args)
	}
	committedCRDs := filepath.Join(root, printed("print-crd-dir"))
	// Installs the tool from the Go module proxy when it is missing.
	if b, err := exec.Command("make", "-s", "-C", root, args[0]).CombinedOutput(); err != nil {
		t.Fatalf("installing %s: %v\n%s", args[0], err, b)
	}
	tmp := t.TempDir()
	crdDir, objDir := filepath.Join(tmp, "crds"), filepath.Join(tmp, "object")
	cmd := exec.Command(args[0], append(args[1:], "output:crd:dir="+crdDir, "output:object:dir="+objDir)...)
	cmd.Dir = root
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("controller-gen: %v\n%s", err, b)
	}
	for generated, committed := range map[string]string{
		filepath.Join(objDir, "zz_generated.deepcopy.go"):                   "zz_generated.deepcopy.go",
		filepath.Join(crdDir, "ephemeral-secrets.csi.dev_credentials.yaml"): filepath.Join(committedCRDs, "ephemeral-secrets.csi.dev_credentials.yaml"),
	} {
		want, err := os.ReadFile(generated)
		if err != nil {
			t.Fatal(err)
		}
		got, err := os.ReadFile(committed)
		if err != nil {
			t.Fatalf("%v (run make generate)", err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s is stale: run make generate", committed)
		}
	}
	entries, err := os.ReadDir(crdDir)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 {
		t.Errorf("controller-gen made %d CRDs, the test compares one: add the new one here", len(entries))
	}
}
