package cli

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
)

// Sides of check-config: which process's loading a backend file goes
// through.
const (
	// sideNode is the node plugin beside a cluster issuer (serve
	// --issuer-address, the chart's default): a postgres section is refused.
	sideNode = "node"
	// sideIssuer is the cluster issuer (issuer --backend-config): the
	// postgres section is required, the others are not read.
	sideIssuer = "issuer"
	// sideAll is a node plugin that is its own issuer (serve without
	// --issuer-address: the chart's issuer.enabled=false, the demo).
	sideAll = "all"
)

var sideNames = map[string]string{
	sideNode:   "the node plugin (serve --issuer-address)",
	sideIssuer: "the issuer (issuer --backend-config)",
	sideAll:    "a node plugin without a cluster issuer (serve without --issuer-address)",
}

// CheckConfig is "check-config [--side S] FILE...", as o builds the
// command line: it loads each backend file through the code the chosen
// side loads it with at start (decoding, the providers' constructors and
// their checks, the trust files they read), connecting to no backend,
// and says what is wrong with each. It returns the exit code: 0 every
// file loads, 1 one does not, 2 bad usage. Nothing it prints quotes a
// value of a file: those hold admin credentials.
func CheckConfig(o Options, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("check-config", flag.ContinueOnError)
	fs.SetOutput(stderr)
	side := fs.String("side", sideNode, "whose loading to check: node (serve --issuer-address, the chart's default), "+
		"issuer (issuer --backend-config), all (serve without --issuer-address: the node is its own issuer)")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: check-config [--side node|issuer|all] FILE...")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if _, ok := sideNames[*side]; !ok || fs.NArg() == 0 {
		fs.Usage()
		return 2
	}
	code := 0
	for _, path := range fs.Args() {
		summary, err := checkFile(o, *side, path)
		if err != nil {
			code = 1
			fmt.Fprintf(stderr, "%s: does not load in %s:\n  %v\n", path, sideNames[*side], err)
			if data, rerr := os.ReadFile(path); rerr == nil && o.Locate != nil {
				for _, where := range o.Locate(data) {
					fmt.Fprintf(stderr, "  %s\n", where)
				}
			}
			continue
		}
		fmt.Fprintf(stdout, "%s: loads in %s: %s\n", path, sideNames[*side], summary)
	}
	return code
}

// checkFile loads the backend file at path as side does and returns what
// it configures.
func checkFile(o Options, side, path string) (string, error) {
	if side == sideIssuer {
		if o.CheckIssuer == nil {
			return "", errors.New("the issuer is a command of ephemeral-secrets-csi-all: run its check-config --side issuer")
		}
		return o.CheckIssuer(path)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("backend config: %w", err)
	}
	b := &backends{path: path, sections: o.Sections}
	if side == sideNode {
		b.extra = []Register{RefuseAdminOnNode}
	}
	reg, built, err := b.providers(data)
	if err != nil {
		return "", err
	}
	closeBuilt(built) // never started: they connected to nothing
	names := reg.Names()
	if len(names) == 0 {
		return "no provider configured", nil
	}
	return "providers " + strings.Join(names, ", "), nil
}
