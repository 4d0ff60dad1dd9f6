// Command driver is the benchmark's build of the node plugin: the real
// command (ephemeral-secrets-csi, pkg/cli) with one more provider,
// "static" (package static), so the benchmark measures the driver and
// not a backend. ./all is the same over ephemeral-secrets-csi-all (the
// issuer in process, for the postgres rows). Neither is ever shipped.
package main

import (
	"net/http"
	_ "net/http/pprof"
	"os"

	"github.com/ephemeral-secrets/csi-driver/pkg/cli"
	"github.com/ephemeral-secrets/csi-driver/test/bench/driver/static"
)

func main() {
	// ESC_BENCH_PPROF=127.0.0.1:6060 serves net/http/pprof, for profiling.
	if addr := os.Getenv("ESC_BENCH_PPROF"); addr != "" {
		go func() { _ = http.ListenAndServe(addr, nil) }()
	}
	os.Exit(cli.Main("bench", os.Args[1:], static.Register))
}
