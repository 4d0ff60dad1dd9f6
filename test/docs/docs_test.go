// Package docs holds the documentation (README.md and docs/) to what the
// code does: every shell block marked for testing is run, every relative
// link and anchor resolves, every test the docs name exists, and the
// generated reference of the backend file is current (backendsref).
//
// A block is marked by an HTML comment on the line before its fence:
//
//	<!-- test: local -->        run in the repository's root with the
//	                            freshly built ephemeral-secrets-csi and helm
//	                            on the PATH, no cluster
//	<!-- test: kube NAME -->    the same, plus kubectl and KUBECONFIG for a
//	                            real kube-apiserver (test/kube) that the
//	                            blocks of this file with the same NAME
//	                            share, in their order; a new NAME is a new
//	                            API server
//
// Blocks run with bash -e -o pipefail, as a reader would paste them. What
// cannot run here (kind, docker, a published chart, anything waiting on a
// kubelet) is left unmarked; docs/development.md says which and why.
package docs

import (
	"bufio"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"

	"k8s.io/klog/v2"

	"github.com/ephemeral-secrets/csi-driver/test/kube"
)

const root = "../.."

// block is one marked shell block.
type block struct {
	file    string // relative to root
	line    int    // of the fence
	sandbox string // local or kube
	cluster string // kube: the API server's name within the file
	script  string
}

func (b block) String() string { return fmt.Sprintf("%s:%d", b.file, b.line) }

// documents are README.md and every Markdown file under docs/.
func documents(t *testing.T) []string {
	t.Helper()
	files := []string{"README.md"}
	err := filepath.WalkDir(filepath.Join(root, "docs"), func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() && strings.HasSuffix(p, ".md") {
			rel, _ := filepath.Rel(root, p)
			files = append(files, rel)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(files)
	return files
}

var marker = regexp.MustCompile(`^<!-- test: (local|kube)(?: ([a-z0-9-]+))? -->$`)

// markedBlocks returns the marked blocks of file; a marker that is
// malformed or not followed by a ```sh fence fails the test.
func markedBlocks(t *testing.T, file string) []block {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(root, file))
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(string(data), "\n")
	var out []block
	for i, l := range lines {
		if !strings.HasPrefix(l, "<!-- test:") {
			continue
		}
		m := marker.FindStringSubmatch(l)
		switch {
		case m == nil:
			t.Errorf("%s:%d: malformed marker %q (<!-- test: local --> or <!-- test: kube NAME -->)", file, i+1, l)
			continue
		case m[1] == "kube" && m[2] == "":
			t.Errorf("%s:%d: a kube block needs the name of its API server", file, i+1)
			continue
		case i+1 >= len(lines) || lines[i+1] != "```sh":
			t.Errorf("%s:%d: a marker must stand right before a ```sh fence", file, i+1)
			continue
		}
		b := block{file: file, line: i + 2, sandbox: m[1], cluster: m[2]}
		var script []string
		closed := false
		for _, s := range lines[i+2:] {
			if s == "```" {
				closed = true
				break
			}
			script = append(script, s)
		}
		if !closed {
			t.Errorf("%s: the block never ends", b)
			continue
		}
		b.script = strings.Join(script, "\n") + "\n"
		out = append(out, b)
	}
	return out
}

// tools is a directory of the commands blocks may call, put first on
// their PATH: the driver's binaries built from this tree, helm and kubectl
// as make kube and make kubectl install them.
func tools(t *testing.T, kubectl bool) string {
	t.Helper()
	dir := t.TempDir()
	// The image's binaries, side by side as there: the node plugins run
	// the cluster's commands and check-config by the all-in-one.
	for _, bin := range []string{"ephemeral-secrets-csi", "ephemeral-secrets-csi-aws", "ephemeral-secrets-csi-all"} {
		build := exec.Command("go", "build", "-o", filepath.Join(dir, bin), "./cmd/"+bin)
		build.Dir = root
		if out, err := build.CombinedOutput(); err != nil {
			t.Fatalf("building %s: %v\n%s", bin, err, out)
		}
	}
	names := []string{"helm"}
	if kubectl {
		names = append(names, "kubectl")
	}
	for _, n := range names {
		p, err := kube.Tool(n)
		if err != nil {
			t.Fatalf("%v (kubectl: make kubectl)", err)
		}
		if err := os.Symlink(p, filepath.Join(dir, n)); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// run runs b's script with bash in the repository's root, with env.
func run(t *testing.T, b block, env []string) {
	t.Helper()
	cmd := exec.Command("bash", "-e", "-o", "pipefail", "-c", b.script)
	cmd.Dir = root
	cmd.Env = env
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Errorf("%s: %v\n--- script\n%s--- output\n%s", b, err, b.script, out)
		return
	}
	t.Logf("%s:\n%s", b, out)
}

// sandboxEnv is what every block gets: the tools first on the PATH, and a
// home and caches of its own (helm writes there).
func sandboxEnv(t *testing.T, bin string) []string {
	home := t.TempDir()
	return []string{
		"PATH=" + bin + ":" + os.Getenv("PATH"),
		"HOME=" + home,
		"HELM_CACHE_HOME=" + filepath.Join(home, "cache"),
		"HELM_CONFIG_HOME=" + filepath.Join(home, "config"),
		"HELM_DATA_HOME=" + filepath.Join(home, "data"),
		"GOCACHE=" + goEnv(t, "GOCACHE"), "GOPATH=" + goEnv(t, "GOPATH"),
	}
}

func goEnv(t *testing.T, name string) string {
	out, err := exec.Command("go", "env", name).Output()
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(out))
}

// TestMarkedCommands runs every marked block: local ones as they are,
// kube ones against a real API server per (file, name).
func TestMarkedCommands(t *testing.T) {
	var local []block
	kubeGroups := map[string][]block{}
	var groupOrder []string
	for _, f := range documents(t) {
		for _, b := range markedBlocks(t, f) {
			if b.sandbox == "local" {
				local = append(local, b)
				continue
			}
			key := b.file + " " + b.cluster
			if _, ok := kubeGroups[key]; !ok {
				groupOrder = append(groupOrder, key)
			}
			kubeGroups[key] = append(kubeGroups[key], b)
		}
	}
	if len(local) == 0 || len(kubeGroups) == 0 {
		t.Fatalf("%d local and %d kube groups of marked blocks: the markers are gone", len(local), len(kubeGroups))
	}
	bin := tools(t, true)
	t.Run("local", func(t *testing.T) {
		env := sandboxEnv(t, bin)
		for _, b := range local {
			run(t, b, env)
		}
	})
	for _, key := range groupOrder {
		blocks := kubeGroups[key]
		t.Run(strings.ReplaceAll(key, " ", ":"), func(t *testing.T) {
			c, err := kube.Start()
			if err != nil {
				t.Fatal(err)
			}
			defer c.Stop()
			env := sandboxEnv(t, bin)
			kubeconfig := filepath.Join(t.TempDir(), "kubeconfig")
			if err := c.Kubeconfig(kubeconfig, "", kube.AdminToken); err != nil {
				t.Fatal(err)
			}
			env = append(env, "KUBECONFIG="+kubeconfig)
			for _, b := range blocks {
				run(t, b, env)
				if t.Failed() {
					return // the blocks after it build on it
				}
			}
		})
	}
}

// link is [text](target) outside code; image links included.
var link = regexp.MustCompile(`\]\(([^)\s]+)\)`)

// TestLinksResolve: every relative link of the docs names a file that
// exists, and every #anchor a heading of its target.
func TestLinksResolve(t *testing.T) {
	for _, f := range documents(t) {
		for _, l := range prose(t, f) {
			for _, m := range link.FindAllStringSubmatch(l.text, -1) {
				target := m[1]
				if strings.HasPrefix(target, "http://") || strings.HasPrefix(target, "https://") || strings.HasPrefix(target, "mailto:") {
					continue
				}
				path, frag, _ := strings.Cut(target, "#")
				dest := f
				if path != "" {
					dest = filepath.Join(filepath.Dir(f), path)
					if _, err := os.Stat(filepath.Join(root, dest)); err != nil {
						t.Errorf("%s:%d: %s: no such file", f, l.n, target)
						continue
					}
				}
				if frag != "" {
					if !strings.HasSuffix(dest, ".md") {
						t.Errorf("%s:%d: %s: an anchor in a file that is not Markdown", f, l.n, target)
					} else if !anchors(t, dest)[frag] {
						t.Errorf("%s:%d: %s: %s has no heading #%s", f, l.n, target, dest, frag)
					}
				}
			}
		}
	}
}

type numbered struct {
	n    int
	text string
}

// prose returns the lines of file outside fenced code.
func prose(t *testing.T, file string) []numbered {
	t.Helper()
	fh, err := os.Open(filepath.Join(root, file))
	if err != nil {
		t.Fatal(err)
	}
	defer fh.Close()
	var out []numbered
	fenced := false
	s := bufio.NewScanner(fh)
	s.Buffer(make([]byte, 1<<20), 1<<20)
	for n := 1; s.Scan(); n++ {
		if strings.HasPrefix(s.Text(), "```") {
			fenced = !fenced
			continue
		}
		if !fenced {
			out = append(out, numbered{n, s.Text()})
		}
	}
	return out
}

// anchors are the GitHub anchors of file's headings.
func anchors(t *testing.T, file string) map[string]bool {
	out := map[string]bool{}
	drop := regexp.MustCompile(`[^\p{L}\p{N}_\- ]`)
	for _, l := range prose(t, file) {
		if h, ok := strings.CutPrefix(l.text, "#"); ok {
			h = strings.TrimLeft(h, "#")
			h = drop.ReplaceAllString(strings.ToLower(strings.TrimSpace(h)), "")
			out[strings.ReplaceAll(h, " ", "-")] = true
		}
	}
	return out
}

// TestNamedTestsExist: every test, fuzz target and benchmark the docs
// name (TestX, FuzzX, BenchmarkX; TestX* for a family) is a function of a
// _test.go file of the repository.
func TestNamedTestsExist(t *testing.T) {
	named := regexp.MustCompile("`((?:Test|Fuzz|Benchmark)[A-Z][A-Za-z0-9_]*)(\\*?)`")
	defined := map[string]bool{}
	fn := regexp.MustCompile(`(?m)^func ((?:Test|Fuzz|Benchmark)[A-Za-z0-9_]+)\(`)
	err := filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (d.Name() == ".git" || d.Name() == "bin") {
			return filepath.SkipDir
		}
		if strings.HasSuffix(p, "_test.go") {
			src, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			for _, m := range fn.FindAllStringSubmatch(string(src), -1) {
				defined[m[1]] = true
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	count := 0
	for _, f := range documents(t) {
		data, err := os.ReadFile(filepath.Join(root, f))
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range named.FindAllStringSubmatch(string(data), -1) {
			count++
			if m[2] == "*" {
				found := false
				for d := range defined {
					found = found || strings.HasPrefix(d, m[1])
				}
				if !found {
					t.Errorf("%s names %s*: no test starts so", f, m[1])
				}
			} else if !defined[m[1]] {
				t.Errorf("%s names %s: no such test", f, m[1])
			}
		}
	}
	if count < 20 {
		t.Errorf("only %d tests named in the docs: the pattern misses them", count)
	}
}

// TestReadmeIsAFrontPage: README.md stays short, and starts (first code
// block) with the two commands of a fresh machine, which CI runs.
func TestReadmeIsAFrontPage(t *testing.T) {
	data, err := os.ReadFile(filepath.Join(root, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(string(data), "\n"); n > 250 {
		t.Errorf("README.md has %d lines: keep it a front page (at most 250), the rest goes to docs/", n)
	}
	_, after, _ := strings.Cut(string(data), "```sh\n")
	first, _, _ := strings.Cut(after, "```")
	if !strings.HasPrefix(first, "make demo") || !strings.Contains(first, "\nmake test") {
		t.Errorf("README.md's first code block is not make demo and make test:\n%s", first)
	}
}

// TestEveryFlagIsDocumented: every flag of serve and issuer (as their
// -h lists them; klog's own, but -v, left out) is in its table of
// docs/configuration.md.
func TestEveryFlagIsDocumented(t *testing.T) {
	bin := tools(t, false)
	klogFlags := flag.NewFlagSet("klog", flag.ContinueOnError)
	klog.InitFlags(klogFlags)
	doc, err := os.ReadFile(filepath.Join(root, "docs", "configuration.md"))
	if err != nil {
		t.Fatal(err)
	}
	flagLine := regexp.MustCompile(`(?m)^\s+-([a-z0-9_-]+)`)
	for _, cmd := range []string{"serve", "issuer"} {
		heading := "## Flags of `ephemeral-secrets-csi " + cmd + "`"
		_, section, ok := strings.Cut(string(doc), heading)
		if !ok {
			t.Errorf("docs/configuration.md has no %q", heading)
			continue
		}
		if i := strings.Index(section, "\n## "); i >= 0 {
			section = section[:i]
		}
		out, _ := exec.Command(filepath.Join(bin, "ephemeral-secrets-csi"), cmd, "-h").CombinedOutput()
		flags := flagLine.FindAllStringSubmatch(string(out), -1)
		if len(flags) < 10 {
			t.Fatalf("%s -h lists %d flags:\n%s", cmd, len(flags), out)
		}
		for _, m := range flags {
			name := m[1]
			if klogFlags.Lookup(name) != nil && name != "v" {
				continue
			}
			dashes := "--"
			if name == "v" {
				dashes = "-"
			}
			if !strings.Contains(section, "`"+dashes+name+"`") {
				t.Errorf("%s's flag %s%s is not in docs/configuration.md, %s", cmd, dashes, name, heading)
			}
		}
	}
}
