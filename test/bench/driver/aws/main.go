// Command aws is the benchmark's build of ephemeral-secrets-csi-aws (the
// node plugin with the aws section, pkg/cli/awssection) with the "static"
// provider: the memory rows of the binary the chart runs with
// providers.aws.enabled, beside the node plugin's. Never shipped.
package main

import (
	"os"

	"github.com/ephemeral-secrets/csi-driver/pkg/cli"
	"github.com/ephemeral-secrets/csi-driver/pkg/cli/awssection"
	"github.com/ephemeral-secrets/csi-driver/test/bench/driver/static"
)

func main() {
	os.Exit(cli.MainOf("bench", os.Args[1:], awssection.Options(static.Register)))
}
