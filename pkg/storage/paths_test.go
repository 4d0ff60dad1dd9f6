package storage

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

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
