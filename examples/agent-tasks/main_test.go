package main

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"
)

func TestBadFlagsExit2(t *testing.T) {
	for _, args := range [][]string{
		{"--tasks", "only-one"},
		{"--no-such-flag"},
		{"call"},
		{"call", "GET"},
	} {
		var out bytes.Buffer
		if code := run(context.Background(), args, &out); code != 2 {
			t.Errorf("%v: exit %d, want 2\n%s", args, code, out.String())
		}
	}
}

func TestRedactKeepsThePasswordOut(t *testing.T) {
	err := redact(errors.New(`cannot parse "postgres://user:s3cret-pass@db:5432/shop": bad`))
	if strings.Contains(err.Error(), "s3cret") || !strings.Contains(err.Error(), "@db:5432") {
		t.Errorf("redacted: %q", err)
	}
}

// With no socket behind the volume, the agent fails with the reason.
func TestNoSocketFails(t *testing.T) {
	var out bytes.Buffer
	if code := run(context.Background(), []string{"--volume", t.TempDir()}, &out); code != 1 || !strings.Contains(out.String(), "FAILED") {
		t.Errorf("exit %d:\n%s", code, out.String())
	}
}
