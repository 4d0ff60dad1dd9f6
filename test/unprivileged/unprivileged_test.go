// Package unprivileged guards the lease core's unprivileged test tier:
// run as root (as make test runs), it builds the test binaries of
// pkg/lease/... and runs them as nobody (uid 65534) with nothing on PATH,
// so no PostgreSQL, Vault or mount can be found, and fails unless they
// pass, the crash-point enumeration ran in memory (not skipped) and the
// privileged tier skipped (the proof that they ran unprivileged). A test
// that needs root slipped into the unprivileged tier fails here.
package unprivileged

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

const nobody = 65534

// packages are the packages of the lease core whose tests must pass
// unprivileged, and what each one's run must show.
var packages = []struct {
	path string
	// ran are tests that must have passed, not skipped.
	ran []string
	// skipped are tests that must have skipped: they need root.
	skipped []string
	// counted matches a line whose number must be positive.
	counted *regexp.Regexp
}{
	{
		path:    "./pkg/lease",
		ran:     []string{"TestCrashAtEveryWrite/memory", "TestTaskLeases/memory", "TestRenewalTimeline"},
		skipped: []string{"TestCrashAtEveryWrite/tmpfs"},
		counted: regexp.MustCompile(`(?m)^crash points enumerated \(memory\): (\d+)$`),
	},
	{path: "./pkg/lease/keylock"},
	{path: "./pkg/lease/outbox"},
	{path: "./pkg/lease/revocation"},
}

func TestLeaseTierPassesUnprivileged(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run the tier as another user (as any other user, go test ./pkg/lease/... is the tier)")
	}
	// Not t.TempDir, whose parent only root may enter.
	dir, err := os.MkdirTemp("", "unprivileged-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	bin := filepath.Join(dir, "bin")
	home := filepath.Join(dir, "home") // the tests' TMPDIR and HOME
	empty := filepath.Join(dir, "empty")
	for _, d := range []string{bin, home, empty} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(home, nobody, nobody); err != nil {
		t.Fatal(err)
	}
	var total time.Duration
	for _, p := range packages {
		t.Run(strings.TrimPrefix(p.path, "./"), func(t *testing.T) {
			exe := filepath.Join(bin, strings.ReplaceAll(strings.TrimPrefix(p.path, "./"), "/", "_")+".test")
			build := exec.Command("go", "test", "-c", "-o", exe, p.path)
			build.Dir = "../.."
			if out, err := build.CombinedOutput(); err != nil {
				t.Fatalf("building %s: %v\n%s", p.path, err, out)
			}
			run := exec.Command(exe, "-test.count=1", "-test.v")
			run.Dir = filepath.Join("../..", p.path) // where its testdata is
			run.Env = []string{"PATH=" + empty, "HOME=" + home, "TMPDIR=" + home}
			run.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobody, Gid: nobody, Groups: []uint32{}}}
			var out bytes.Buffer
			run.Stdout, run.Stderr = &out, &out
			start := time.Now()
			err := run.Run()
			took := time.Since(start)
			total += took
			t.Logf("%s as uid %d: %s", p.path, nobody, took.Round(time.Millisecond))
			if err != nil {
				t.Fatalf("%s failed as uid %d: %v\n%s", p.path, nobody, err, tail(out.String(), 60))
			}
			results := parse(out.String())
			for _, name := range p.ran {
				if results[name] != "PASS" {
					t.Errorf("%s: %s did not run and pass unprivileged (%q)", p.path, name, results[name])
				}
			}
			for name, res := range results { // every test of the unprivileged tier, named or not
				if res == "SKIP" && (strings.HasSuffix(name, "/memory") || strings.Contains(name, "/memory/")) {
					t.Errorf("%s: %s skipped unprivileged: the memory tier must run as any user", p.path, name)
				}
			}
			for _, name := range p.skipped {
				if results[name] != "SKIP" {
					t.Errorf("%s: %s needs root but did not skip (%q): did the run drop root?", p.path, name, results[name])
				}
			}
			if p.counted != nil {
				m := p.counted.FindStringSubmatch(out.String())
				if m == nil {
					t.Errorf("%s: no line matching %s", p.path, p.counted)
				} else if n, _ := strconv.Atoi(m[1]); n == 0 {
					t.Errorf("%s: %s", p.path, m[0])
				}
			}
		})
	}
	t.Logf("the unprivileged tier took %s (test binaries already built)", total.Round(time.Millisecond))
}

// parse returns each test's result ("PASS", "FAIL", "SKIP") from -test.v
// output.
func parse(out string) map[string]string {
	res := map[string]string{}
	for _, m := range regexp.MustCompile(`(?m)^\s*--- (PASS|FAIL|SKIP): (\S+)`).FindAllStringSubmatch(out, -1) {
		res[m[2]] = m[1]
	}
	return res
}

func tail(s string, lines int) string {
	l := strings.Split(s, "\n")
	if len(l) > lines {
		l = l[len(l)-lines:]
	}
	return fmt.Sprint(strings.Join(l, "\n"))
}
