// Command ephemeral-secrets-csi is the node plugin of the
// ephemeral-secrets.csi.dev CSI driver. See pkg/cli for its subcommands.
package main

import (
	"os"

	"github.com/ephemeral-secrets/csi-driver/pkg/cli"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	os.Exit(cli.Main(version, os.Args[1:]))
}
