package storage

import "path/filepath"

// WriteLegacyLease writes the volume's legacy lease record as a driver
// before keyed lease records did: for the contract test (package
// storage_test), which the in-memory store also passes.
func (f *Filesystem) WriteLegacyLease(id string, v any) error {
	return writeJSON(filepath.Join(f.volumeDir(id), legacyLease), v)
}
