package lease

import (
	"regexp"
	"strings"
	"testing"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

func TestNewLeaseID(t *testing.T) {
	valid := regexp.MustCompile(`^[a-z0-9-]{1,48}$`)
	seen := map[string]bool{}
	for _, pod := range []provider.Pod{
		{Namespace: "ai-agents", Name: "research-agent-7f9c"},
		{Namespace: strings.Repeat("n", 63), Name: strings.Repeat("p.q", 80)},
		{Namespace: "a", Name: "b"},
	} {
		for range 100 {
			id := newLeaseID(pod)
			if !valid.MatchString(id) || seen[id] {
				t.Fatalf("lease ID %q invalid or repeated", id)
			}
			seen[id] = true
		}
	}
	if id := newLeaseID(provider.Pod{Namespace: "ai-agents", Name: "agent"}); !strings.HasPrefix(id, "ai-agents-agent-") {
		t.Errorf("%q does not say which pod it is for", id)
	}
}

func TestParseGID(t *testing.T) {
	for in, want := range map[string]int{"": -1, "0": 0, "2000": 2000} {
		if got, err := ParseGID(in); err != nil || got != want {
			t.Errorf("ParseGID(%q) = %d, %v", in, got, err)
		}
	}
	for _, in := range []string{"wheel", "-1", "99999999999", "1.5"} {
		if _, err := ParseGID(in); err == nil {
			t.Errorf("ParseGID(%q) accepted", in)
		}
	}
}
