package storage

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ephemeral-secrets/csi-driver/pkg/volumepath"
)

const dataLink = "..data"

// SocketName is the lease socket at a volume's root. It is no file of the
// volume's: WriteFiles never writes, replaces or removes it.
const SocketName = "lease.sock"

// WriteFiles replaces the volume's files with files, atomically (no
// files: the volume is emptied, but for its lease socket): a reader
// sees either the old set or the new one, never a mix. It follows the
// scheme of Kubernetes' AtomicWriter (written afresh here): the files go
// into a new hidden directory, the "..data" symlink is switched to it with
// one rename, each top-level name is a symlink through "..data", and the
// old directory is removed last.
//
// Files are owned by root and gid (0 when gid < 0) with their own mode.
func (f *Filesystem) WriteFiles(id string, gid int, files []File) error {
	if len(files) > f.opts.MaxFiles {
		return fmt.Errorf("%w: %d files, at most %d", ErrTooLarge, len(files), f.opts.MaxFiles)
	}
	var total int64
	top := map[string]bool{}
	for _, file := range files {
		if err := volumepath.Check(file.Path); err != nil {
			return err
		}
		if strings.SplitN(file.Path, "/", 2)[0] == SocketName {
			return fmt.Errorf("%w: %q is the volume's lease socket", ErrInvalidPath, file.Path)
		}
		total += int64(len(file.Data))
		top[strings.SplitN(file.Path, "/", 2)[0]] = true
	}
	if total > f.opts.MaxVolumeBytes {
		return fmt.Errorf("%w: %d bytes, at most %d", ErrTooLarge, total, f.opts.MaxVolumeBytes)
	}
	gid = max(gid, 0)
	dir := f.DataDir(id)
	if len(files) == 0 {
		return emptyDir(dir)
	}
	_, oldErr := os.Readlink(filepath.Join(dir, dataLink))
	hadVersion := oldErr == nil
	newDir, err := f.writeVersion(dir, gid, files)
	if err != nil {
		return err
	}
	tmpLink := filepath.Join(dir, "..data_tmp")
	_ = os.Remove(tmpLink)
	if err := os.Symlink(newDir, tmpLink); err != nil {
		_ = os.RemoveAll(filepath.Join(dir, newDir))
		return err
	}
	if err := os.Rename(tmpLink, filepath.Join(dir, dataLink)); err != nil {
		_ = os.RemoveAll(filepath.Join(dir, newDir))
		return err
	}
	// Top-level names point through ..data; add the new ones, drop the gone ones.
	for name := range top {
		link := filepath.Join(dir, name)
		if _, err := os.Lstat(link); err == nil {
			continue
		}
		if err := os.Symlink(filepath.Join(dataLink, name), link); err != nil {
			return err
		}
	}
	if !hadVersion {
		return nil // a first write: nothing old to remove
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, e := range entries {
		name := e.Name()
		if strings.HasPrefix(name, "..") {
			if name != dataLink && name != newDir && e.IsDir() {
				_ = os.RemoveAll(filepath.Join(dir, name)) // old versions, and leftovers of a crash
			}
			continue
		}
		if !top[name] && name != SocketName {
			_ = os.Remove(filepath.Join(dir, name))
		}
	}
	return nil
}

// writeVersion writes files into a new hidden directory of dir and
// returns its name.
func (f *Filesystem) writeVersion(dir string, gid int, files []File) (string, error) {
	var rnd [6]byte
	_, _ = rand.Read(rnd[:])
	name := ".." + time.Now().UTC().Format("2006_01_02_15_04_05.") + hex.EncodeToString(rnd[:])
	base := filepath.Join(dir, name)
	dirMode := os.FileMode(0o755)
	if gid > 0 {
		dirMode = 0o750
	}
	mkdir := func(p string) error {
		if err := os.Mkdir(p, dirMode); err != nil {
			if errors.Is(err, os.ErrExist) {
				return nil
			}
			return err
		}
		if dirMode&f.umask != 0 {
			if err := os.Chmod(p, dirMode); err != nil {
				return err
			}
		}
		if gid == 0 {
			return nil // we are root: already root:root
		}
		return os.Chown(p, 0, gid)
	}
	fail := func(err error) (string, error) {
		_ = os.RemoveAll(base)
		if errors.Is(err, unix.ENOSPC) || errors.Is(err, unix.EDQUOT) {
			return "", fmt.Errorf("%w: the volume's tmpfs is full", ErrTooLarge)
		}
		return "", err
	}
	if err := mkdir(base); err != nil {
		return fail(err)
	}
	for _, file := range files {
		p := filepath.Join(base, file.Path)
		if d := filepath.Dir(file.Path); d != "." {
			cur := base
			for _, c := range strings.Split(d, "/") {
				cur = filepath.Join(cur, c)
				if err := mkdir(cur); err != nil {
					return fail(err)
				}
			}
		}
		// Created with its final mode: a pod cannot open the volume's files
		// before ..data points at them, so no window needs guarding.
		mode := file.Mode.Perm()
		fd, err := unix.Open(p, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, uint32(mode))
		if err != nil {
			return fail(fmt.Errorf("creating %s: %w", file.Path, err))
		}
		err = writeAll(fd, file.Data)
		if err == nil && gid != 0 {
			err = unix.Fchown(fd, 0, gid)
		}
		if err == nil && mode&f.umask != 0 {
			err = unix.Fchmod(fd, uint32(mode))
		}
		if cerr := unix.Close(fd); err == nil {
			err = cerr
		}
		if err != nil {
			return fail(fmt.Errorf("writing %s: %w", file.Path, err))
		}
	}
	return name, nil
}

func writeAll(fd int, data []byte) error {
	for len(data) > 0 {
		n, err := unix.Write(fd, data)
		if err != nil {
			return err
		}
		data = data[n:]
	}
	return nil
}

// emptyDir empties a volume's directory but for its lease socket: the
// top-level names first, through which readers find the files, then the
// versions behind them.
func emptyDir(dir string) error {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if name := e.Name(); !strings.HasPrefix(name, "..") && name != SocketName {
			if err := os.Remove(filepath.Join(dir, name)); err != nil && !errors.Is(err, os.ErrNotExist) {
				return err
			}
		}
	}
	if err := os.Remove(filepath.Join(dir, dataLink)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	for _, e := range entries {
		if name := e.Name(); strings.HasPrefix(name, "..") && name != dataLink {
			if err := os.RemoveAll(filepath.Join(dir, name)); err != nil {
				return err
			}
		}
	}
	return nil
}
