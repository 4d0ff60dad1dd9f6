// Command pause is the pod sandbox process of the test cluster (the image
// esc.local/pause:1): it holds the pod's namespaces open, doing nothing,
// until SIGTERM or SIGINT, then exits 0. It reaps no children.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
}
