package harness

import "github.com/ephemeral-secrets/csi-driver/test/freeport"

// FreePorts returns n distinct TCP ports free on 127.0.0.1 right now, for
// servers that tests start and that take a port on their command line.
func FreePorts(n int) ([]int, error) { return freeport.Ports(n) }
