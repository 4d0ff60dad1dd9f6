package storage

import (
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// Release leaves nothing on the node when the store holds nothing: no
// volume and no pending revocation. It removes what the state directory holds and
// unmounts the state tmpfs if it is a mount of its own. A store that holds
// anything is kept as it is (the next start resumes it) and Release
// reports false.
func (f *Filesystem) Release() (bool, error) {
	vols, err := f.ListMetadata()
	if err != nil {
		return false, err
	}
	revs, err := f.ListRevocations()
	if err != nil {
		return false, err
	}
	if len(vols) > 0 || len(revs) > 0 {
		return false, nil
	}
	entries, err := os.ReadDir(f.root)
	if err != nil {
		return false, err
	}
	for _, e := range entries { // empty volume directories, non-secret records
		if err := os.RemoveAll(filepath.Join(f.root, e.Name())); err != nil {
			return false, err
		}
	}
	if mounted, err := f.mounter.IsMountPoint(f.root); err == nil && mounted {
		if err := unix.Unmount(f.root, unix.MNT_DETACH); err != nil {
			return false, fmt.Errorf("unmounting the state tmpfs: %w", err)
		}
	}
	return true, nil
}
