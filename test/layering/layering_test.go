// Package layering holds the import rules of the driver's packages to the
// code: every package under pkg/ and cmd/ has a rank, imports only
// packages of a lower rank (a lower layer), and says in its package
// comment which of our packages it imports.
package layering

import (
	"encoding/json"
	"go/parser"
	"go/token"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/ephemeral-secrets/csi-driver/test/image"
)

const module = "github.com/ephemeral-secrets/csi-driver/"

// rank is the declared order, lowest layer first: a package may import
// ours only of a strictly lower rank. A new package gets a line here.
var rank = map[string]int{
	// 0: leaves, none of ours.
	"pkg/apis/ephemeralsecrets/v1alpha1": 0, // the inventory's API types
	"pkg/metrics":                        0,
	"pkg/registration":                   0,
	"pkg/volumepath":                     0,
	"pkg/lease/keylock":                  0,
	"pkg/provider":                       0, // the provider contract
	// 1: on the contract's plain types: the record of a live credential,
	// and the volume store, which knows nothing of leases (it keeps their
	// records opaque).
	"pkg/credential": 1,
	"pkg/storage":    1,
	// 2: beside the contract: the providers, audit, events, classes.
	"pkg/audit":             2,
	"pkg/events":            2,
	"pkg/spc":               2,
	"pkg/lease/state":       2, // the state machine's records and their codec
	"pkg/limits":            2,
	"pkg/provider/aws":      2,
	"pkg/provider/gcp":      2,
	"pkg/provider/vault":    2,
	"pkg/provider/postgres": 2,
	"pkg/storage/memory":    2, // the volume store in memory, for the unprivileged tests
	"pkg/issuer/postgres":   2, // the issuer's SQL engine: pools, statements, SQLSTATE classes
	"pkg/inventory/record":  2, // the Credential records as the node plugin writes and watches them
	// 3: the lease manager's workers and what it renders; the issuer's
	// use observation; the inventory.
	"pkg/render":             3,
	"pkg/lease/outbox":       3,
	"pkg/lease/revocation":   3,
	"pkg/issuer/use":         3, // the sessions of the issuer's credentials, sampled (issue 21)
	"pkg/issuer/remote/wire": 3, // the issuer's protocol and the node plugin's client
	"pkg/inventory":          3,
	// 4: each volume's in-memory state and its lock; the issuer, which
	// runs its use observation; 5: the issuer's transport.
	"pkg/lease/volume":  4,
	"pkg/issuer":        4,
	"pkg/issuer/remote": 5,
	// 5: the state machine.
	"pkg/lease": 5,
	// 6: the node's edges: the CSI server and the lease socket.
	"pkg/driver":   6,
	"pkg/leaseapi": 6,
	// 7: the node plugin's command line, 8: its aws section (the aws
	// node plugin's and the all-in-one's), 9: the all-in-one's command
	// line, 10: the binaries.
	"pkg/cli":                       7,
	"pkg/cli/awssection":            8,
	"pkg/cli/allinone":              9,
	"cmd/ephemeral-secrets-csi":     10,
	"cmd/ephemeral-secrets-csi-aws": 10,
	"cmd/ephemeral-secrets-csi-all": 10,
}

// allowed are the imports against the order that are known and meant to
// go; each says why it is still here. Do not add to it lightly.
var allowed = map[[2]string]string{}

// docExempt are packages whose comment is not yet checked for the
// packages it imports (owned by another change this round); each still
// needs a package comment.
var docExempt = map[string]bool{
	"pkg/cli":                   true,
	"pkg/inventory":             true,
	"pkg/issuer":                true,
	"pkg/issuer/remote":         true,
	"pkg/provider/postgres":     true,
	"cmd/ephemeral-secrets-csi": true,
}

type pkg struct {
	ImportPath string
	Dir        string
	Name       string
	GoFiles    []string
	Imports    []string
}

func list(t *testing.T) []pkg {
	t.Helper()
	cmd := exec.Command("go", "list", "-json", "./pkg/...", "./cmd/...")
	cmd.Dir = "../.."
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	var pkgs []pkg
	dec := json.NewDecoder(strings.NewReader(string(out)))
	for dec.More() {
		var p pkg
		if err := dec.Decode(&p); err != nil {
			t.Fatal(err)
		}
		p.ImportPath = strings.TrimPrefix(p.ImportPath, module)
		pkgs = append(pkgs, p)
	}
	if len(pkgs) < len(rank)/2 {
		t.Fatalf("go list found %d packages", len(pkgs))
	}
	return pkgs
}

// ours are the packages of this module that p imports, module-relative.
func (p pkg) ours() []string {
	var out []string
	for _, imp := range p.Imports {
		if rel, ok := strings.CutPrefix(imp, module); ok {
			out = append(out, rel)
		}
	}
	return out
}

func TestNoPackageImportsOneAboveIt(t *testing.T) {
	seen := map[string]bool{}
	for _, p := range list(t) {
		seen[p.ImportPath] = true
		r, ok := rank[p.ImportPath]
		if !ok {
			t.Errorf("%s has no rank: add it to the table", p.ImportPath)
			continue
		}
		for _, imp := range p.ours() {
			ri, ok := rank[imp]
			switch {
			case !ok:
				t.Errorf("%s imports %s, which has no rank", p.ImportPath, imp)
			case ri >= r && allowed[[2]string{p.ImportPath, imp}] == "":
				t.Errorf("%s (rank %d) imports %s (rank %d): a package imports only lower layers",
					p.ImportPath, r, imp, ri)
			}
		}
	}
	for name := range rank {
		if !seen[name] {
			t.Errorf("the table ranks %s, which is gone: remove it", name)
		}
	}
	for edge := range allowed {
		if rank[edge[0]] > rank[edge[1]] {
			t.Errorf("%s → %s is allowed explicitly but follows the order: remove it from allowed", edge[0], edge[1])
		}
	}
}

// TestPackageCommentsNameTheirImports: each package has a comment, and
// that comment names every package of ours it imports ("pkg/provider"),
// or says it imports none of ours.
func TestPackageCommentsNameTheirImports(t *testing.T) {
	for _, p := range list(t) {
		var doc strings.Builder
		for _, f := range p.GoFiles {
			af, err := parser.ParseFile(token.NewFileSet(), filepath.Join(p.Dir, f), nil,
				parser.PackageClauseOnly|parser.ParseComments)
			if err != nil {
				t.Fatal(err)
			}
			if af.Doc != nil {
				doc.WriteString(af.Doc.Text())
			}
		}
		text := strings.Join(strings.Fields(doc.String()), " ")
		if text == "" {
			t.Errorf("%s has no package comment: say its job and what it may import", p.ImportPath)
			continue
		}
		if docExempt[p.ImportPath] {
			continue
		}
		imports := p.ours()
		if len(imports) == 0 && !strings.Contains(text, "none of our packages") {
			t.Errorf("%s imports none of our packages; its comment should say so", p.ImportPath)
		}
		for _, imp := range imports {
			if !strings.Contains(text, imp) {
				t.Errorf("%s imports %s, which its package comment does not name", p.ImportPath, imp)
			}
		}
	}
}

// testOnly are packages under pkg/ that exist for tests (an implementation
// of a contract that runs without root): the driver's binary must never
// link them.
var testOnly = []string{"pkg/storage/memory"}

// deps are the packages main package pkg links, built with the build
// tags tags.
func deps(t *testing.T, pkg string, tags ...string) []string {
	t.Helper()
	cmd := exec.Command("go", "list", "-deps", "-tags", strings.Join(tags, ","), pkg)
	cmd.Dir = "../.."
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	d := strings.Fields(string(out))
	if len(d) < 10 {
		t.Fatalf("go list -deps %s found %d packages", pkg, len(d))
	}
	return d
}

func TestTheBinaryLinksNoTestOnlyPackage(t *testing.T) {
	for _, bin := range []string{"./cmd/ephemeral-secrets-csi", "./cmd/ephemeral-secrets-csi-aws", "./cmd/ephemeral-secrets-csi-all"} {
		d := deps(t, bin)
		for _, p := range testOnly {
			if slices.Contains(d, module+p) {
				t.Errorf("%s links %s, which is for tests only", bin, p)
			}
		}
	}
}

// nodePlugins are the binaries a DaemonSet runs as the node plugin: the
// lean one, and the same with the aws section (the chart's with
// providers.aws.enabled), which may link the AWS SDK (mayLink: prefixes
// of import paths taken off nodeNeverLinks) and nothing else the lean
// one must not.
var nodePlugins = []struct {
	pkg     string
	mayLink []string
}{
	{"./cmd/ephemeral-secrets-csi", nil},
	{"./cmd/ephemeral-secrets-csi-aws", []string{"github.com/aws/"}},
}

// nodeNeverLinks are what the node plugin's binary must not link: a
// DaemonSet pays for every page of a binary on every node, and any typed
// client-go client runs kubernetes/scheme's init (every API group: 10 MiB
// resident here), the AWS SDK's inits 6 MiB more. Prefixes of import
// paths; the cluster's commands and those providers are
// ephemeral-secrets-csi-all's (the AWS SDK also ephemeral-secrets-csi-aws's).
var nodeNeverLinks = []string{
	"k8s.io/client-go/kubernetes",
	"k8s.io/client-go/informers",
	"k8s.io/client-go/tools/leaderelection",
	"k8s.io/api/",
	"github.com/aws/",
	"github.com/jackc/",
	module + "pkg/issuer/postgres",
	// check-config's locator of a bad key (a second YAML parser, 0.35 MiB
	// resident in the node plugin): the all-in-one's (cli.Options.Locate).
	"go.yaml.in/yaml/v3",
}

// nodeNeverLinksBuilt are what the node plugin must not link as it is
// built (with image.BuildTags): gRPC's request tracing and its
// html/template.
var nodeNeverLinksBuilt = []string{"golang.org/x/net/trace", "html/template"}

// nodeNeverLinksExactly are packages the node plugin must not link whose
// sub-packages it may (pkg/issuer/remote/wire, pkg/inventory/record).
var nodeNeverLinksExactly = []string{
	module + "pkg/issuer",
	module + "pkg/issuer/remote",
	module + "pkg/inventory",
	module + "pkg/cli/allinone",
}

func TestTheNodePluginLinksOnlyWhatANodeNeeds(t *testing.T) {
	for _, bin := range nodePlugins {
		d := deps(t, bin.pkg)
		for _, p := range d {
			if slices.Contains(nodeNeverLinksExactly, p) {
				t.Errorf("%s links %s", bin.pkg, p)
				continue
			}
			for _, prefix := range nodeNeverLinks {
				if strings.HasPrefix(p, prefix) && !slices.Contains(bin.mayLink, prefix) {
					t.Errorf("%s links %s", bin.pkg, p)
				}
			}
		}
		// What it may link, it does: the allowance is not stale.
		for _, prefix := range bin.mayLink {
			if !slices.ContainsFunc(d, func(p string) bool { return strings.HasPrefix(p, prefix) }) {
				t.Errorf("%s links nothing under %s: remove it from its mayLink", bin.pkg, prefix)
			}
		}
	}
	// The check can fail: the all-in-one links what the node plugin must not.
	all := deps(t, "./cmd/ephemeral-secrets-csi-all")
	for _, p := range []string{"k8s.io/client-go/kubernetes", "k8s.io/client-go/tools/leaderelection", module + "pkg/issuer"} {
		if !slices.Contains(all, p) {
			t.Errorf("the all-in-one does not link %s: the list above may be stale", p)
		}
	}
}

// TestTheNodePluginKeepsDeadCodeElimination: each node plugin, built as
// it ships, reaches no call that looks a method up by name at run time
// (reflect's Method, MethodByName; text/template's and html/template's
// Execute, and whatever calls them). One such call anywhere makes the
// linker keep every exported method of every type the binary links: 3.5
// MB of the node plugin and about 1.7 MiB of its resident memory, on
// every node. pkg/render runs templates with an evaluator of its own for
// this reason.
func TestTheNodePluginKeepsDeadCodeElimination(t *testing.T) {
	for _, bin := range nodePlugins {
		t.Run(filepath.Base(bin.pkg), func(t *testing.T) {
			keepsDeadCodeElimination(t, bin.pkg)
		})
	}
}

// keepsDeadCodeElimination checks main package pkg as the test above says.
func keepsDeadCodeElimination(t *testing.T, pkg string) {
	for _, p := range deps(t, pkg, image.BuildTags) {
		if slices.Contains(nodeNeverLinksBuilt, p) {
			t.Errorf("%s, built with -tags %s, links %s", pkg, image.BuildTags, p)
		}
	}
	// The linker says which reachable functions make such calls.
	cmd := exec.Command("go", "build", "-tags", image.BuildTags, "-ldflags=-dumpdep", "-o", filepath.Join(t.TempDir(), "node"), pkg)
	cmd.Dir = "../.."
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	seen := map[string]bool{}
	edges := 0
	for _, line := range strings.Split(string(out), "\n") {
		from, to, ok := strings.Cut(line, " -> ")
		if !ok {
			continue
		}
		edges++
		for _, sym := range []string{from, to} {
			if name, found := strings.CutSuffix(sym, " <ReflectMethod>"); found && !seen[name] {
				seen[name] = true
				t.Errorf("%s reaches %s, which looks methods up by name: the linker keeps every exported method", pkg, name)
			}
		}
	}
	if edges < 1000 {
		t.Fatalf("the linker's dependency dump has %d edges: -dumpdep no longer prints them?", edges)
	}
}
