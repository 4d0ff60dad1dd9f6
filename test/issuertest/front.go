package issuertest

import (
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

// Front stands for the issuer's Service: a TCP front that passes each
// connection (TLS and all) to a replica that accepts it, the routed one
// first. A killed replica refuses connections and the next one gets them,
// as kube-proxy's endpoints would once the pod is gone.
type Front struct {
	ln    net.Listener
	mu    sync.Mutex
	addrs []string // the routed one first
	conns map[net.Conn]struct{}
	done  chan struct{}
}

// NewFront listens on a free local port in front of addrs.
func NewFront(addrs ...string) (*Front, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	f := &Front{ln: ln, addrs: addrs, conns: map[net.Conn]struct{}{}, done: make(chan struct{})}
	go f.serve()
	return f, nil
}

// URL is the address node plugins dial (the certificate names localhost).
func (f *Front) URL() string {
	return fmt.Sprintf("https://localhost:%d", f.ln.Addr().(*net.TCPAddr).Port)
}

// Route sends new connections to addr while it accepts them, and closes
// the open ones: a client's next call opens a connection to addr (HTTP/2
// would otherwise keep all calls on one replica).
func (f *Front) Route(addr string) {
	f.mu.Lock()
	order := []string{addr}
	for _, a := range f.addrs {
		if a != addr {
			order = append(order, a)
		}
	}
	f.addrs = order
	for c := range f.conns {
		_ = c.Close()
	}
	f.mu.Unlock()
}

// Close stops listening and closes every connection.
func (f *Front) Close() {
	_ = f.ln.Close()
	<-f.done
	f.mu.Lock()
	for c := range f.conns {
		_ = c.Close()
	}
	f.mu.Unlock()
}

func (f *Front) serve() {
	defer close(f.done)
	for {
		c, err := f.ln.Accept()
		if err != nil {
			return
		}
		go f.pass(c)
	}
}

// pass joins c to the first replica that accepts a connection.
func (f *Front) pass(c net.Conn) {
	f.mu.Lock()
	addrs := append([]string(nil), f.addrs...)
	f.mu.Unlock()
	var up net.Conn
	for _, a := range addrs {
		var err error
		if up, err = net.DialTimeout("tcp", a, time.Second); err == nil {
			break
		}
	}
	if up == nil {
		_ = c.Close()
		return
	}
	f.mu.Lock()
	f.conns[c], f.conns[up] = struct{}{}, struct{}{}
	f.mu.Unlock()
	var wg sync.WaitGroup
	wg.Add(2)
	for _, p := range [][2]net.Conn{{c, up}, {up, c}} {
		go func() {
			defer wg.Done()
			_, _ = io.Copy(p[0], p[1])
			_ = p[0].Close()
			_ = p[1].Close()
		}()
	}
	wg.Wait()
	f.mu.Lock()
	delete(f.conns, c)
	delete(f.conns, up)
	f.mu.Unlock()
}
