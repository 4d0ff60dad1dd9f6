package volumepath

import (
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
		{strings.Repeat("a", MaxLen+1), false},
	} {
		if err := Check(tc.path); (err == nil) != tc.ok {
			t.Errorf("Check(%q) = %v, want ok=%v", tc.path, err, tc.ok)
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
		if Check(p) != nil {
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
