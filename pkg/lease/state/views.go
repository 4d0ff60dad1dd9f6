package state

import (
	"crypto/rand"
	"encoding/base32"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

var leaseEncoding = base32.NewEncoding("abcdefghijklmnopqrstuvwxyz234567").WithPadding(base32.NoPadding)

// NewLeaseID makes a unique, non-secret ID of [a-z0-9-] that says which pod
// the lease is for: "<namespace>-<pod>-<random>", at most 48 bytes.
func NewLeaseID(pod provider.Pod) string {
	var b [5]byte
	_, _ = rand.Read(b[:])
	suffix := leaseEncoding.EncodeToString(b[:]) // 8 characters
	clean := func(s string, n int) string {
		s = strings.Map(func(r rune) rune {
			if r >= 'a' && r <= 'z' || r >= '0' && r <= '9' {
				return r
			}
			return '-'
		}, strings.ToLower(s))
		if len(s) > n {
			s = s[:n]
		}
		return strings.Trim(s, "-")
	}
	return clean(pod.Namespace, 16) + "-" + clean(pod.Name, 21) + "-" + suffix
}

// TaskOf names the task whose lease leaseID is, or "".
func (m Metadata) TaskOf(leaseID string) string {
	for id, t := range m.Tasks {
		if t.LeaseID == leaseID {
			return id
		}
	}
	return ""
}

// WithTask returns m with t as task's record (nil: none); m is unchanged.
func (m Metadata) WithTask(task string, t *Task) Metadata {
	m.Tasks = maps.Clone(m.Tasks)
	if t == nil {
		delete(m.Tasks, task)
	} else {
		if m.Tasks == nil {
			m.Tasks = map[string]Task{}
		}
		m.Tasks[task] = *t
	}
	if len(m.Tasks) == 0 {
		m.Tasks = nil
	}
	return m
}

// Held is every lease the volume holds: cur first (if m names it), then
// every lease record of the volume, then (by ID alone) what m names
// without a record: a pending issue, the current lease, its tasks'.
func (m Metadata) Held(cur provider.Lease, records []provider.Lease) []provider.Lease {
	var out []provider.Lease
	seen := map[string]bool{}
	add := func(l provider.Lease) {
		if l.ID != "" && !seen[l.ID] {
			seen[l.ID] = true
			out = append(out, l)
		}
	}
	if m.LeaseID != "" && cur.ID == m.LeaseID {
		add(cur)
	}
	for _, l := range records {
		add(l)
	}
	named := []string{m.PendingLeaseID, m.LeaseID}
	for _, task := range slices.Sorted(maps.Keys(m.Tasks)) {
		named = append(named, m.Tasks[task].LeaseID)
	}
	for _, lid := range named {
		add(m.Named(lid))
	}
	return out
}

// Named is the lease of ID id as m knows it without its record: enough
// for its provider to revoke it by ID.
func (m Metadata) Named(id string) provider.Lease {
	return provider.Lease{ID: id, Provider: m.Provider, Params: m.Params}
}

// GrantedAt is when a recovered lease's current grant began: the latest
// of its issue and its last recorded renewal. A crash between recording a
// renewed lease and its metadata leaves an earlier time, which only
// brings the next renewal forward.
func (m Metadata) GrantedAt(l provider.Lease) time.Time {
	t := l.IssuedAt
	for _, u := range []time.Time{m.IssuedAt, m.RenewedAt} {
		if u.After(t) && l.ID == m.LeaseID {
			t = u
		}
	}
	return t
}

// GrantTTL is the lifetime l was issued with, granted (at the latest)
// at asked.
func GrantTTL(l provider.Lease, asked time.Time) time.Duration {
	if l.ExpiresAt.IsZero() {
		return 0
	}
	from := l.IssuedAt
	if from.IsZero() {
		from = asked
	}
	return max(l.ExpiresAt.Sub(from), 0)
}
