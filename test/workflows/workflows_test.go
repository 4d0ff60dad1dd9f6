// Package workflows checks the GitHub Actions workflows offline (make
// release-check runs it; actionlint, in make lint, checks their syntax):
// every action is pinned to a commit, the same action to the same commit
// everywhere; a pull request runs the linters and the tests with a
// read-only token; a release runs the tests first, signs what it
// publishes and attaches an SBOM and provenance to the image.
package workflows

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"
)

var dir = filepath.Join("..", "..", ".github", "workflows")

// uses matches a `uses:` line: the reference and the comment after it.
var uses = regexp.MustCompile(`^\s*(?:-\s+)?uses:\s*["']?([^"'\s#]+)["']?\s*(?:#\s*(.*))?$`)

// pinned is an action or reusable workflow at a full commit SHA.
var pinned = regexp.MustCompile(`^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+(/[^@]+)?@[0-9a-f]{40}$`)

// version is the comment that names the pinned commit's tag.
var version = regexp.MustCompile(`^v\d+(\.\d+)*$`)

// A Finding is one rule a workflow breaks.
type Finding struct {
	File string
	Line int
	What string
}

func (f Finding) String() string { return fmt.Sprintf("%s:%d: %s", f.File, f.Line, f.What) }

// checkPins finds every `uses:` that is not pinned to a commit with its
// tag in a comment, and actions pinned to different commits in different
// places (pins is shared across files: action -> "sha # tag").
func checkPins(file string, content []byte, pins map[string]string) []Finding {
	var out []Finding
	for i, line := range strings.Split(string(content), "\n") {
		m := uses.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		ref, comment := m[1], strings.TrimSpace(m[2])
		switch {
		case strings.HasPrefix(ref, "./"):
			continue // this repository's own, at the same commit
		case strings.HasPrefix(ref, "docker://"):
			if !regexp.MustCompile(`@sha256:[0-9a-f]{64}$`).MatchString(ref) {
				out = append(out, Finding{file, i + 1, ref + ": a container action must be pinned by @sha256: digest"})
			}
			continue
		case !pinned.MatchString(ref):
			out = append(out, Finding{file, i + 1, ref + ": not pinned to a 40-hex commit SHA"})
			continue
		case !version.MatchString(comment):
			out = append(out, Finding{file, i + 1, ref + ": the pin needs its tag in a comment (# vX.Y.Z)"})
			continue
		}
		action, sha, _ := strings.Cut(ref, "@")
		pin := sha + " # " + comment
		if prev, ok := pins[action]; ok && prev != pin {
			out = append(out, Finding{file, i + 1, fmt.Sprintf("%s pinned to %s here and %s elsewhere", action, pin, prev)})
		}
		pins[action] = pin
	}
	return out
}

// workflow is the part of a workflow file the rules read.
type workflow struct {
	On map[string]any `json:"on"`
	// OnYAML11 is "on" where the YAML reader took the key for YAML 1.1's
	// boolean true.
	OnYAML11    map[string]any    `json:"true"`
	Permissions map[string]string `json:"permissions"`
	Jobs        map[string]struct {
		Needs       any               `json:"needs"`
		Permissions map[string]string `json:"permissions"`
		Steps       []struct {
			Uses string `json:"uses"`
			Run  string `json:"run"`
		} `json:"steps"`
	} `json:"jobs"`
}

func read(t *testing.T, name string) (workflow, []byte) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, name))
	if err != nil {
		t.Fatal(err)
	}
	var w workflow
	if err := yaml.Unmarshal(b, &w); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return w, b
}

// runs is every run: script of the workflow, joined.
func (w workflow) runs() string {
	var all []string
	for _, j := range w.Jobs {
		for _, s := range j.Steps {
			all = append(all, s.Run)
		}
	}
	return strings.Join(all, "\n")
}

func TestEveryActionIsPinnedToACommit(t *testing.T) {
	files, err := filepath.Glob(filepath.Join(dir, "*.y*ml"))
	if err != nil || len(files) < 2 {
		t.Fatalf("workflows: %v %v", files, err)
	}
	pins := map[string]string{}
	n := 0
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, fd := range checkPins(filepath.Base(f), b, pins) {
			t.Error(fd)
		}
		n += strings.Count(string(b), "uses:")
	}
	if n == 0 || len(pins) == 0 {
		t.Fatal("no action found: the check checked nothing")
	}
}

// The rule itself: what it must refuse and accept.
func TestCheckPins(t *testing.T) {
	const sha = "de0fac2e4500dabe0009e67214ff5f5447ce83dd"
	for _, tc := range []struct {
		line  string
		fails bool
	}{
		{"      - uses: actions/checkout@v4", true},
		{"      - uses: actions/checkout@main", true},
		{"      - uses: actions/checkout@de0fac2", true},
		{"      - uses: actions/checkout@" + sha, true}, // no tag comment
		{"      - uses: actions/checkout@" + sha + " # v6.0.2", false},
		{"      - uses: 'actions/checkout@" + sha + "' # v6.0.2", false},
		{"    uses: org/repo/.github/workflows/x.yaml@" + sha + " # v1", false},
		{"    uses: org/repo/.github/workflows/x.yaml@v1", true},
		{"      - uses: ./.github/actions/local", false},
		{"      - uses: docker://alpine:3", true},
		{"      - uses: docker://alpine@sha256:" + strings.Repeat("a", 64), false},
	} {
		got := checkPins("w.yaml", []byte(tc.line), map[string]string{})
		if (len(got) > 0) != tc.fails {
			t.Errorf("%q: findings %v, want fails=%v", tc.line, got, tc.fails)
		}
	}
	pins := map[string]string{}
	checkPins("a.yaml", []byte("- uses: actions/checkout@"+sha+" # v6.0.2"), pins)
	if got := checkPins("b.yaml", []byte("- uses: actions/checkout@"+strings.Repeat("1", 40)+" # v6.0.2"), pins); len(got) != 1 {
		t.Errorf("one action at two commits: %v, want one finding", got)
	}
}

func TestPullRequestsRunTheLintersAndTheTests(t *testing.T) {
	w, raw := read(t, "pr.yaml")
	on := w.On
	if on == nil {
		on = w.OnYAML11
	}
	if _, ok := on["pull_request"]; !ok {
		t.Error("pr.yaml does not run on pull_request")
	}
	if strings.Contains(string(raw), "pull_request_target") {
		t.Error("pull_request_target runs a fork's code with the repository's secrets")
	}
	if w.Permissions["contents"] != "read" || len(w.Permissions) != 1 {
		t.Errorf("pr.yaml permissions %v, want contents: read only", w.Permissions)
	}
	runs := w.runs()
	for _, want := range []string{"make lint", "make test-hosted", "make chart-test", "make workflows-check"} {
		if !strings.Contains(runs, want) {
			t.Errorf("pr.yaml does not run %q", want)
		}
	}
}

func TestReleasesAreTestedSignedAndAttested(t *testing.T) {
	w, _ := read(t, "release.yaml")
	runs := w.runs()
	for _, want := range []string{"make release-check", "make lint", "make test-hosted", "make release-artifacts", "make release-push", "make release-sign"} {
		if !strings.Contains(runs, want) {
			t.Errorf("release.yaml does not run %q", want)
		}
	}
	if w.Permissions["contents"] != "read" || len(w.Permissions) != 1 {
		t.Errorf("release.yaml top-level permissions %v, want contents: read only (the publishing job asks for more)", w.Permissions)
	}
	publishing := 0
	for name, j := range w.Jobs {
		var push, cosign, provenance bool
		for _, s := range j.Steps {
			push = push || strings.Contains(s.Run, "make release-push")
			cosign = cosign || strings.HasPrefix(s.Uses, "sigstore/cosign-installer@")
			provenance = provenance || strings.HasPrefix(s.Uses, "actions/attest-build-provenance@")
		}
		if !push {
			continue
		}
		publishing++
		if !strings.Contains(fmt.Sprint(j.Needs), "test") {
			t.Errorf("job %s publishes without needing the test job", name)
		}
		for perm, want := range map[string]string{"id-token": "write", "attestations": "write", "packages": "write", "contents": "write"} {
			if j.Permissions[perm] != want {
				t.Errorf("job %s: permission %s is %q, want %s (keyless signing, provenance, ghcr.io, the GitHub release)", name, perm, j.Permissions[perm], want)
			}
		}
		if !cosign || !provenance {
			t.Errorf("job %s: cosign installed %v, provenance attested %v; want both", name, cosign, provenance)
		}
	}
	if publishing != 1 {
		t.Errorf("%d jobs publish, want 1", publishing)
	}
}
