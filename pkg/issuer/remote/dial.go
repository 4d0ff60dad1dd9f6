package remote

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// Dial opens a connection (net.Dialer.DialContext).
type Dial func(ctx context.Context, network, addr string) (net.Conn, error)

// ServiceDial dials addr with dial, and where the name of a Service
// ("name.namespace.svc", with or without the cluster domain) does not
// resolve (a node without cluster DNS), dials the Service's cluster IP
// read through the API instead; the TLS name stays the Service's.
func ServiceDial(cs kubernetes.Interface, dial Dial) Dial {
	var mu sync.Mutex
	ips := map[string]string{} // "namespace/name" -> cluster IP
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		conn, err := dial(ctx, network, addr)
		var dnsErr *net.DNSError
		if err == nil || !errors.As(err, &dnsErr) {
			return conn, err
		}
		host, port, serr := net.SplitHostPort(addr)
		labels := strings.Split(host, ".")
		if serr != nil || len(labels) < 3 || labels[2] != "svc" {
			return nil, err
		}
		key := labels[1] + "/" + labels[0]
		mu.Lock()
		ip := ips[key]
		mu.Unlock()
		if ip == "" {
			svc, gerr := cs.CoreV1().Services(labels[1]).Get(ctx, labels[0], metav1.GetOptions{})
			if gerr != nil {
				return nil, fmt.Errorf("%w; reading Service %s: %v", err, key, gerr)
			}
			if ip = svc.Spec.ClusterIP; ip == "" || ip == "None" {
				return nil, fmt.Errorf("%w; Service %s has no cluster IP", err, key)
			}
			mu.Lock()
			ips[key] = ip
			mu.Unlock()
		}
		conn, err = dial(ctx, network, net.JoinHostPort(ip, port))
		if err != nil { // read the Service again next time
			mu.Lock()
			delete(ips, key)
			mu.Unlock()
		}
		return conn, err
	}
}
