// Command gendocs writes the generated parts of the documentation
// (docs/backends.md, the backend file's reference) from the Go types.
// Run from the module root: make docs.
package main

import (
	"fmt"
	"os"

	"github.com/ephemeral-secrets/csi-driver/test/docs/backendsref"
)

func main() {
	out, err := backendsref.Generate(".")
	if err == nil {
		err = os.WriteFile(backendsref.Output, out, 0o644)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "gendocs:", err)
		os.Exit(1)
	}
}
