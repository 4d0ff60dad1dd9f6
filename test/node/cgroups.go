package node

import (
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// cgroupV1 is where this machine mounts its cgroup v1 hierarchies.
const cgroupV1 = "/sys/fs/cgroup"

// makeCgroupRoot makes kubelet's cgroup root in every v1 hierarchy.
// The cgroup file system is the host's (namespaces do not cover it), so
// everything kubelet makes lives under this root, and Stop removes it.
func makeCgroupRoot(root string) error {
	hierarchies, err := os.ReadDir(cgroupV1)
	if err != nil {
		return err
	}
	for _, h := range hierarchies {
		if h.Name() == "unified" {
			continue
		}
		dir := filepath.Join(cgroupV1, h.Name(), root)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
		if h.Name() == "cpuset" {
			// A new cpuset has no CPUs or memory nodes until given some.
			for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
				v, err := os.ReadFile(filepath.Join(cgroupV1, "cpuset", f))
				if err != nil {
					return err
				}
				if err := os.WriteFile(filepath.Join(dir, f), v, 0o644); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// removeCgroupRoot removes the root and every cgroup under it, deepest
// first (a cgroup goes only once its processes and children are gone).
func removeCgroupRoot(root string) {
	if root == "" || root == "/" {
		return
	}
	hierarchies, _ := os.ReadDir(cgroupV1)
	for _, h := range hierarchies {
		top := filepath.Join(cgroupV1, h.Name(), root)
		var dirs []string
		_ = filepath.WalkDir(top, func(path string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, path)
			}
			return nil
		})
		sort.Slice(dirs, func(i, j int) bool { return strings.Count(dirs[i], "/") > strings.Count(dirs[j], "/") })
		for _, d := range dirs {
			_ = os.Remove(d)
		}
	}
}
