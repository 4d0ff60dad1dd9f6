package state

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
			id := NewLeaseID(pod)
			if !valid.MatchString(id) || seen[id] {
				t.Fatalf("lease ID %q invalid or repeated", id)
			}
			seen[id] = true
		}
	}
	if id := NewLeaseID(provider.Pod{Namespace: "ai-agents", Name: "agent"}); !strings.HasPrefix(id, "ai-agents-agent-") {
		t.Errorf("%q does not say which pod it is for", id)
	}
}

func TestValidTask(t *testing.T) {
	for id, ok := range map[string]bool{
		"a": true, "a-1": true, strings.Repeat("a", 63): true, "0": true,
		"": false, strings.Repeat("a", 64): false, "-a": false, "a-": false, "A": false, "a_b": false, "../x": false, "a\n": false,
	} {
		if err := ValidTask(id); (err == nil) != ok {
			t.Errorf("ValidTask(%q) = %v, want valid %v", id, err, ok)
		}
	}
}
