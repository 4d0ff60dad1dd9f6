package storage

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/ephemeral-secrets/csi-driver/pkg/volumepath"
)

// ErrInvalidPath means a name or path from a user or from kubelet would
// leave the place it must stay in: volumepath's error, so one check of
// errors.Is covers both.
var ErrInvalidPath = volumepath.ErrInvalid

// TargetPolicy checks NodePublishVolume target paths: they must be the
// mount directory kubelet gives an inline CSI volume of this pod,
// <KubeletDir>/pods/<pod-uid>/volumes/kubernetes.io~csi/<name>/mount,
// with no symbolic link anywhere below KubeletDir.
type TargetPolicy struct {
	KubeletDir string
}

// Check validates target for the pod with the given UID: CheckPath, then
// CheckNoSymlinks.
func (p TargetPolicy) Check(target, podUID string) error {
	if err := p.CheckPath(target, podUID); err != nil {
		return err
	}
	return p.CheckNoSymlinks(target)
}

// CheckPath checks the shape of target, without touching the filesystem.
func (p TargetPolicy) CheckPath(target, podUID string) error {
	root := filepath.Clean(p.KubeletDir)
	if !filepath.IsAbs(target) || filepath.Clean(target) != target {
		return fmt.Errorf("%w: target path must be absolute and clean", ErrInvalidPath)
	}
	rel, err := filepath.Rel(root, target)
	if err != nil || strings.HasPrefix(rel, "..") {
		return fmt.Errorf("%w: target path is not under the kubelet directory %s", ErrInvalidPath, root)
	}
	parts := strings.Split(rel, "/")
	if len(parts) != 6 || parts[0] != "pods" || parts[2] != "volumes" || parts[3] != "kubernetes.io~csi" || parts[5] != "mount" {
		return fmt.Errorf("%w: target path is not %s/pods/<pod-uid>/volumes/kubernetes.io~csi/<volume>/mount", ErrInvalidPath, root)
	}
	if podUID == "" || parts[1] != podUID {
		return fmt.Errorf("%w: target path is not in the directory of pod %s", ErrInvalidPath, podUID)
	}
	return volumepath.Check(parts[4])
}

// CheckNoSymlinks checks that no component of target below the kubelet
// directory (which may itself be a link) is a symbolic link or not a
// directory. The final "mount" directory need not exist yet. Call it just
// before mounting: it is a look at the filesystem, not a shape check.
func (p TargetPolicy) CheckNoSymlinks(target string) error {
	root := filepath.Clean(p.KubeletDir)
	rel, err := filepath.Rel(root, target)
	if err != nil {
		return fmt.Errorf("%w: %v", ErrInvalidPath, err)
	}
	parts := strings.Split(rel, "/")
	cur := root
	for i, c := range parts {
		cur = filepath.Join(cur, c)
		st, err := os.Lstat(cur)
		if errors.Is(err, os.ErrNotExist) && i >= len(parts)-2 {
			return nil // kubelet had not made it yet, or we make "mount" ourselves
		}
		if err != nil {
			return fmt.Errorf("%w: %s: %v", ErrInvalidPath, cur, errors.Unwrap(err))
		}
		if st.Mode()&os.ModeSymlink != 0 {
			return fmt.Errorf("%w: %s is a symbolic link", ErrInvalidPath, cur)
		}
		if !st.IsDir() {
			return fmt.Errorf("%w: %s is not a directory", ErrInvalidPath, cur)
		}
	}
	return nil
}
