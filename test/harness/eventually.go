package harness

import (
	"testing"
	"time"
)

// Eventually polls cond every 100 ms until it holds without error, and
// fails the test with what and the last error when timeout passes first.
func Eventually(t testing.TB, timeout time.Duration, what string, cond func() (bool, error)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var lastErr error
	for time.Now().Before(deadline) {
		ok, err := cond()
		if ok && err == nil {
			return
		}
		lastErr = err
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("%s: not within %s (last error: %v)", what, timeout, lastErr)
}
