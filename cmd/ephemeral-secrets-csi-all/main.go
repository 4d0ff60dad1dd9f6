// Command ephemeral-secrets-csi-all is the image's second binary: the
// cluster issuer, the housekeeper, helm's uninstall hook, and the node
// plugin with every provider and the issuer in process. See
// pkg/cli/allinone for its subcommands.
package main

import (
	"os"

	"github.com/ephemeral-secrets/csi-driver/pkg/cli/allinone"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	os.Exit(allinone.Main(version, os.Args[1:]))
}
