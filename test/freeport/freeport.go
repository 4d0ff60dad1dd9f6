// Package freeport picks free TCP ports on the loopback address for the
// servers tests start. It imports nothing of the driver, so that test
// servers used inside the driver's own packages (test/pgtest in
// pkg/lease) make no import cycle.
package freeport

import "net"

// Ports returns n distinct TCP ports free on 127.0.0.1 right now, for
// servers that tests start and that take a port on their command line.
func Ports(n int) ([]int, error) {
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	ports := make([]int, 0, n)
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}
