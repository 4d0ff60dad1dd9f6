package wire

import (
	"context"
	"fmt"
	"net"
	"strings"
	"sync"
)

// Dial opens a connection (net.Dialer.DialContext).
type Dial func(ctx context.Context, network, addr string) (net.Conn, error)

// ClusterIP reads the cluster IP of Service namespace/name through the
// API ("" or "None": it has none).
type ClusterIP func(ctx context.Context, namespace, name string) (string, error)

// ServiceDial dials the name of a Service ("name.namespace.svc", with or
// without the cluster domain) at the Service's cluster IP, read through
// the API with lookup (what cluster DNS would answer, without it: a node
// may have no cluster DNS, and a lookup that times out there took 10 s);
// the TLS name stays the Service's. A Service it cannot read, and any
// other address, is dialed as given.
func ServiceDial(lookup ClusterIP, dial Dial) Dial {
	var mu sync.Mutex
	ips := map[string]string{} // "namespace/name" -> cluster IP
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		host, port, err := net.SplitHostPort(addr)
		labels := strings.Split(host, ".")
		if err != nil || len(labels) < 3 || labels[2] != "svc" {
			return dial(ctx, network, addr)
		}
		key := labels[1] + "/" + labels[0]
		mu.Lock()
		ip := ips[key]
		mu.Unlock()
		if ip == "" {
			found, err := lookup(ctx, labels[1], labels[0])
			if err != nil || found == "" || found == "None" {
				conn, derr := dial(ctx, network, addr)
				if derr != nil && err != nil {
					derr = fmt.Errorf("%w (and reading Service %s: %v)", derr, key, err)
				}
				return conn, derr
			}
			ip = found
			mu.Lock()
			ips[key] = ip
			mu.Unlock()
		}
		conn, err := dial(ctx, network, net.JoinHostPort(ip, port))
		if err != nil { // read the Service again next time
			mu.Lock()
			delete(ips, key)
			mu.Unlock()
		}
		return conn, err
	}
}

// CAKey is the key of the issuer's CA ConfigMap that holds its signer's
// certificate.
const CAKey = "ca.crt"

// RootsConfigMap reads the issuer's signer, at each call, from the data
// of its ConfigMap namespace/name as read returns it (the node plugin's
// Roots).
func RootsConfigMap(read func(ctx context.Context) (map[string]string, error), namespace, name string) Roots {
	return func(ctx context.Context) ([]byte, error) {
		data, err := read(ctx)
		if err != nil {
			return nil, err
		}
		if data[CAKey] == "" {
			return nil, fmt.Errorf("ConfigMap %s/%s has no %s", namespace, name, CAKey)
		}
		return []byte(data[CAKey]), nil
	}
}
