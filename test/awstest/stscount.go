package awstest

import (
	"bytes"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"sync"
)

// STSCounter stands between a client and an STS endpoint (MinIO's): it
// passes every request on unchanged and counts the calls by action and
// DurationSeconds, so that a test can tell the sessions of one kind
// minted from those of another.
type STSCounter struct {
	URL string

	srv   *httptest.Server
	mu    sync.Mutex
	calls map[[2]string]int
}

// StartSTSCounter starts a counter in front of target (an http URL).
func StartSTSCounter(target string) (*STSCounter, error) {
	u, err := url.Parse(target)
	if err != nil {
		return nil, err
	}
	c := &STSCounter{calls: map[[2]string]int{}}
	proxy := httputil.NewSingleHostReverseProxy(u)
	c.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		r.Body = io.NopCloser(bytes.NewReader(body))
		form, _ := url.ParseQuery(string(body))
		c.mu.Lock()
		c.calls[[2]string{form.Get("Action"), form.Get("DurationSeconds")}]++
		c.mu.Unlock()
		proxy.ServeHTTP(w, r)
	}))
	c.URL = c.srv.URL
	return c, nil
}

// Calls is how many calls of action asked for a session of duration
// seconds ("" counts them all).
func (c *STSCounter) Calls(action, duration string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for k, v := range c.calls {
		if k[0] == action && (duration == "" || k[1] == duration) {
			n += v
		}
	}
	return n
}

// Close stops the counter.
func (c *STSCounter) Close() { c.srv.Close() }
