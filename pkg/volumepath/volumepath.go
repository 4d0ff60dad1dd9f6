// Package volumepath is the rule for the name of a file inside a volume:
// relative, clean, printable, and never one of the atomic writer's own
// "..name" entries. Everything that turns outside input into a file name
// checks it here: the providers (object names of a class), the renderer
// (file paths of a template) and the store (before it writes). It imports
// none of our packages.
package volumepath

import (
	"errors"
	"fmt"
	"strings"
)

// ErrInvalid means a name or path from a user or from kubelet would leave
// the place it must stay in.
var ErrInvalid = errors.New("invalid path")

// MaxLen bounds a file path inside a volume.
const MaxLen = 255

// Check checks a file path inside a volume: relative, clean, no "." or
// ".." components, not starting with ".." (reserved for the atomic
// writer's own entries), and of printable characters.
func Check(p string) error {
	switch {
	case p == "":
		return fmt.Errorf("%w: empty file name", ErrInvalid)
	case len(p) > MaxLen:
		return fmt.Errorf("%w: file name longer than %d bytes", ErrInvalid, MaxLen)
	case strings.HasPrefix(p, "/"):
		return fmt.Errorf("%w: %q is absolute", ErrInvalid, p)
	case strings.HasPrefix(p, ".."):
		return fmt.Errorf("%w: %q starts with \"..\"", ErrInvalid, p)
	}
	for _, r := range p {
		if r < 0x20 || r == 0x7f || r == '\\' {
			return fmt.Errorf("%w: %q has a control character or backslash", ErrInvalid, p)
		}
	}
	for _, c := range strings.Split(p, "/") {
		if c == "" || c == "." || c == ".." {
			return fmt.Errorf("%w: %q is not a clean relative path", ErrInvalid, p)
		}
	}
	return nil
}
