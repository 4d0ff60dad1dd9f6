package storage

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestValidatePath(t *testing.T) {
	for _, tc := range []struct {
		path string
		ok   bool
	}{
		{"username", true},
		{"config/db.json", true},
		{".hidden", true},
		{"a/b/c", true},
		{"", false},
		{"/etc/passwd", false},
		{"..", false},
		{"../x", false},
		{"..data", false},
		{"a/../b", false},
		{"a/./b", false},
		{"a//b", false},
		{"a/", false},
		{".", false},
		{"a\x00b", false},
		{"a\\b", false},
		{strings.Repeat("a", MaxPathLen+1), false},
	} {
		if err := ValidatePath(tc.path); (err == nil) != tc.ok {
			t.Errorf("ValidatePath(%q) = %v, want ok=%v", tc.path, err, tc.ok)
		}
	}
}

// FuzzValidatePath: whatever it accepts stays inside the directory it is
// joined to, and is not one of the atomic writer's own names.
func FuzzValidatePath(f *testing.F) {
	for _, s := range []string{"username", "a/b", "../x", "/abs", "a/../../b", "..data", "a/./b", "x/..", "\x00"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, p string) {
		if ValidatePath(p) != nil {
			return
		}
		base := "/vol"
		joined := filepath.Join(base, p)
		if !strings.HasPrefix(joined, base+"/") || joined == base {
			t.Fatalf("%q accepted but leaves the volume: %s", p, joined)
		}
		if strings.HasPrefix(p, "..") || filepath.Clean(p) != p {
			t.Fatalf("%q accepted but is not a clean, unreserved name", p)
		}
	})
}

const podUID = "0b9e2f36-6a7c-4d3e-9f4e-3a1c2b5d6e7f"

func TestTargetPolicy(t *testing.T) {
	kd := t.TempDir()
	p := TargetPolicy{KubeletDir: kd}
	good := filepath.Join(kd, "pods", podUID, "volumes", "kubernetes.io~csi", "secrets", "mount")
	if err := os.MkdirAll(filepath.Dir(good), 0o750); err != nil {
		t.Fatal(err)
	}
	outside := t.TempDir()
	symlinked := filepath.Join(kd, "pods", "1b9e2f36-6a7c-4d3e-9f4e-3a1c2b5d6e7f")
	if err := os.MkdirAll(filepath.Join(kd, "pods"), 0o750); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(outside, symlinked); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, target, uid string
		ok                bool
	}{
		{"kubelet layout", good, podUID, true},
		{"other pod's uid", good, "1b9e2f36-6a7c-4d3e-9f4e-3a1c2b5d6e7f", false},
		{"no uid", good, "", false},
		{"relative", "pods/x/mount", podUID, false},
		{"unclean", good + "/../mount", podUID, false},
		{"outside kubelet dir", "/tmp/mount", podUID, false},
		{"not the mount dir", filepath.Dir(good), podUID, false},
		{"other plugin dir", filepath.Join(kd, "pods", podUID, "volumes", "kubernetes.io~secret", "x", "mount"), podUID, false},
		{"through a symlink", filepath.Join(symlinked, "volumes", "kubernetes.io~csi", "s", "mount"), "1b9e2f36-6a7c-4d3e-9f4e-3a1c2b5d6e7f", false},
	} {
		if err := p.Check(tc.target, tc.uid); (err == nil) != tc.ok {
			t.Errorf("%s: Check(%q) = %v, want ok=%v", tc.name, tc.target, err, tc.ok)
		}
	}
}

// FuzzTargetPolicy: an accepted target is always the mount directory of
// that pod's CSI volume, under the kubelet directory.
func FuzzTargetPolicy(f *testing.F) {
	kd := "/nonexistent-kubelet"
	f.Add(kd+"/pods/"+podUID+"/volumes/kubernetes.io~csi/v/mount", podUID)
	f.Add(kd+"/pods/"+podUID+"/volumes/kubernetes.io~csi/../../../../etc/mount", podUID)
	f.Add("/etc/mount", podUID)
	f.Add(kd+"/pods/x/volumes/kubernetes.io~csi/v/mount", "x")
	f.Fuzz(func(t *testing.T, target, uid string) {
		if (TargetPolicy{KubeletDir: kd}).Check(target, uid) != nil {
			return
		}
		prefix := kd + "/pods/" + uid + "/volumes/kubernetes.io~csi/"
		rest, ok := strings.CutPrefix(target, prefix)
		if !ok || uid == "" || strings.Count(rest, "/") != 1 || !strings.HasSuffix(rest, "/mount") || filepath.Clean(target) != target {
			t.Fatalf("accepted %q for pod %q", target, uid)
		}
	})
}
