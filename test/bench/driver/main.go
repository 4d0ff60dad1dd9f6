// Command driver is the benchmark's build of the node plugin: the real
// command (ephemeral-secrets-csi, pkg/cli) with one more provider,
// "static" (package static), so the benchmark measures the driver and
// not a backend, and nothing else: its memory rows are the shipped
// binary's plus that provider. ./all is the same over
// ephemeral-secrets-csi-all (the issuer in process, for the postgres
// rows), which also serves net/http/pprof for profiling. Neither is ever
// shipped.
package main

import (
	"os"

	"github.com/ephemeral-secrets/csi-driver/pkg/cli"
	"github.com/ephemeral-secrets/csi-driver/test/bench/driver/static"
)

func main() {
	os.Exit(cli.Main("bench", os.Args[1:], static.Register))
}
