package node

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// cgroupV1 is where this machine mounts its cgroup v1 hierarchies.
const cgroupV1 = "/sys/fs/cgroup"

// cgroupRootOf is the cgroup root of the node that process pid runs.
func cgroupRootOf(pid int) string { return fmt.Sprintf("/esc-node-%d", pid) }

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
// first (a cgroup goes only once its processes and children are gone:
// killed processes take a moment to leave, so it tries for a while).
func removeCgroupRoot(root string) {
	if root == "" || root == "/" {
		return
	}
	for range 50 {
		killCgroup(root)
		if removeCgroupTree(root) {
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// cgroupProcs lists the processes in the root's cgroups (the pids
// hierarchy holds every process of every pod: sandboxes live in pod
// network namespaces, not the node's).
func cgroupProcs(root string) []int {
	var pids []int
	_ = filepath.WalkDir(filepath.Join(cgroupV1, "pids", root), func(path string, d os.DirEntry, err error) error {
		if err != nil || d.Name() != "cgroup.procs" {
			return nil
		}
		b, _ := os.ReadFile(path)
		for _, f := range strings.Fields(string(b)) {
			if pid, err := strconv.Atoi(f); err == nil {
				pids = append(pids, pid)
			}
		}
		return nil
	})
	return pids
}

// killCgroup kills every process in the root's cgroups.
func killCgroup(root string) {
	for _, pid := range cgroupProcs(root) {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
}

// removeCgroupTree makes one pass and reports whether all is gone.
func removeCgroupTree(root string) bool {
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
	left, _ := filepath.Glob(filepath.Join(cgroupV1, "*", root))
	return len(left) == 0
}
