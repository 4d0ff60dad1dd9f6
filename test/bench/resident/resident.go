// Package resident reads a process's resident memory, as the benchmarks
// report it.
package resident

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// MiB returns the resident memory of process pid (VmRSS) and its
// anonymous part (RssAnon), in MiB.
func MiB(pid int) (total, anon float64, err error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0, err
	}
	found := 0
	for line := range strings.SplitSeq(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 || (f[0] != "VmRSS:" && f[0] != "RssAnon:") {
			continue
		}
		kb, err := strconv.ParseFloat(f[1], 64)
		if err != nil {
			return 0, 0, err
		}
		if f[0] == "VmRSS:" {
			total = kb / 1024
		} else {
			anon = kb / 1024
		}
		found++
	}
	if found != 2 {
		return 0, 0, errors.New("no VmRSS or RssAnon")
	}
	return total, anon, nil
}
