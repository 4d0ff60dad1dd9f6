// Command ephemeral-secrets-csi-aws is the image's third binary: the node
// plugin of ephemeral-secrets-csi (vault, gcp, postgres through the
// issuer) with the aws provider, which the chart runs as the DaemonSet's
// node plugin when providers.aws.enabled and PostgreSQL does not run in
// the node's process. It links the AWS SDK and nothing of the issuer:
// ephemeral-secrets-csi-all, beside it in the image, runs the cluster's
// commands and check-config. See pkg/cli and pkg/cli/awssection.
package main

import (
	"os"

	"github.com/ephemeral-secrets/csi-driver/pkg/cli"
	"github.com/ephemeral-secrets/csi-driver/pkg/cli/awssection"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	os.Exit(cli.MainOf(version, os.Args[1:], awssection.Options()))
}
