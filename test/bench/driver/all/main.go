// Command all is the benchmark's build of ephemeral-secrets-csi-all
// (pkg/cli/allinone) with the "static" provider: the node plugin with the
// issuer in process, for the benchmark's postgres rows. Never shipped.
package main

import (
	"net/http"
	_ "net/http/pprof"
	"os"

	"github.com/ephemeral-secrets/csi-driver/pkg/cli/allinone"
	"github.com/ephemeral-secrets/csi-driver/test/bench/driver/static"
)

func main() {
	// ESC_BENCH_PPROF=127.0.0.1:6060 serves net/http/pprof, for profiling.
	if addr := os.Getenv("ESC_BENCH_PPROF"); addr != "" {
		go func() { _ = http.ListenAndServe(addr, nil) }()
	}
	os.Exit(allinone.Main("bench", os.Args[1:], static.Register))
}
