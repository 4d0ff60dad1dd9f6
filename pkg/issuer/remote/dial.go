package remote

import (
	"context"
	"fmt"
	"net"
	"strings"
	"sync"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// Dial opens a connection (net.Dialer.DialContext).
type Dial func(ctx context.Context, network, addr string) (net.Conn, error)

// ServiceDial dials the name of a Service ("name.namespace.svc", with or
// without the cluster domain) at the Service's cluster IP, read through
// the API (what cluster DNS would answer, without it: a node may have no
// cluster DNS, and a lookup that times out there took 10 s); the TLS name
// stays the Service's. A Service it cannot read, and any other address,
// is dialed as given.
func ServiceDial(cs kubernetes.Interface, dial Dial) Dial {
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
			svc, err := cs.CoreV1().Services(labels[1]).Get(ctx, labels[0], metav1.GetOptions{})
			if err != nil || svc.Spec.ClusterIP == "" || svc.Spec.ClusterIP == "None" {
				conn, derr := dial(ctx, network, addr)
				if derr != nil && err != nil {
					derr = fmt.Errorf("%w (and reading Service %s: %v)", derr, key, err)
				}
				return conn, derr
			}
			ip = svc.Spec.ClusterIP
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
