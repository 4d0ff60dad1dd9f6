package storage

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// readOnlyAttrs are the flags every view of a volume carries.
const readOnlyAttrs = unix.MOUNT_ATTR_RDONLY | unix.MOUNT_ATTR_NOSUID | unix.MOUNT_ATTR_NODEV | unix.MOUNT_ATTR_NOEXEC

// bindReadOnly mounts a read-only, nosuid, nodev, noexec view of src on
// target. The view is made read-only before it is attached: kubelet's pod
// directories are shared mounts, so the attach propagates copies of the
// view to the host and into the pod, and a read-only remount made after
// the bind (the classic way) changes only the driver's own copy, leaving
// the pod a writable one (seen with a real kubelet). Kernels without the
// new mount API (before 5.12) fall back to bind + remount.
func bindReadOnly(src, target string) error {
	fd, err := unix.OpenTree(unix.AT_FDCWD, src, unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC)
	if errors.Is(err, unix.ENOSYS) {
		return bindThenRemount(src, target)
	}
	if err != nil {
		return fmt.Errorf("bind mount: %w", err)
	}
	defer unix.Close(fd)
	attr := &unix.MountAttr{Attr_set: readOnlyAttrs}
	if err := unix.MountSetattr(fd, "", unix.AT_EMPTY_PATH, attr); errors.Is(err, unix.ENOSYS) {
		return bindThenRemount(src, target)
	} else if err != nil {
		return fmt.Errorf("making the bind mount read-only: %w", err)
	}
	if err := unix.MoveMount(fd, "", unix.AT_FDCWD, target, unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
		return fmt.Errorf("attaching the bind mount: %w", err)
	}
	return nil
}

func bindThenRemount(src, target string) error {
	if err := unix.Mount(src, target, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind mount: %w", err)
	}
	flags := uintptr(unix.MS_BIND | unix.MS_REMOUNT | unix.MS_RDONLY | unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC)
	if err := unix.Mount("", target, "", flags, ""); err != nil {
		_ = unix.Unmount(target, 0)
		return fmt.Errorf("read-only remount: %w", err)
	}
	return nil
}
