package harness

import (
	"os"
	"path/filepath"
	"time"
)

// WriteLikeKubelet writes content as the key name of a Secret volume
// mounted at dir, the way kubelet updates one: the content goes to a new
// timestamped directory, the ..data symlink is swapped to it by a rename,
// and dir/name is a symlink through ..data, so its path never changes.
// The previous directory is removed. It returns dir/name.
func WriteLikeKubelet(dir, name, content string) (string, error) {
	old, _ := os.Readlink(filepath.Join(dir, "..data"))
	ts, err := os.MkdirTemp(dir, time.Now().UTC().Format("..2006_01_02_15_04_05."))
	if err != nil {
		return "", err
	}
	if err := os.WriteFile(filepath.Join(ts, name), []byte(content), 0o600); err != nil {
		return "", err
	}
	tmp := filepath.Join(dir, "..data_tmp")
	if err := os.Symlink(filepath.Base(ts), tmp); err != nil {
		return "", err
	}
	if err := os.Rename(tmp, filepath.Join(dir, "..data")); err != nil {
		return "", err
	}
	path := filepath.Join(dir, name)
	if _, err := os.Lstat(path); os.IsNotExist(err) {
		if err := os.Symlink(filepath.Join("..data", name), path); err != nil {
			return "", err
		}
	}
	if old != "" {
		if err := os.RemoveAll(filepath.Join(dir, old)); err != nil {
			return "", err
		}
	}
	return path, nil
}
