package record

import (
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	v1alpha1 "github.com/ephemeral-secrets/csi-driver/pkg/apis/ephemeralsecrets/v1alpha1"
	"github.com/ephemeral-secrets/csi-driver/pkg/credential"
)

// The use of a credential in its record's status: the one conversion
// between credential.Usage (what the issuer saw) and the Credential's
// status fields, both ways.

// LocalSource is the address a source without one is recorded as (a
// session over the database server's Unix socket).
const LocalSource = "local"

// summaryAddresses is how many addresses SourcesSummary names.
const summaryAddresses = 3

// Used is the status of a credential used as u: its times, sources,
// sessions and the Used condition. A status holds at most
// credential.MaxSources sources (the CRD refuses more): any beyond are
// counted as dropped.
func Used(u credential.Usage) func(*v1alpha1.CredentialStatus) {
	return func(st *v1alpha1.CredentialStatus) {
		st.FirstUsedAt, st.LastUsedAt = timeOrNil(u.FirstUsedAt), timeOrNil(u.LastUsedAt)
		st.Sources = nil
		dropped := u.Dropped
		for i, s := range u.Sources {
			if i >= credential.MaxSources {
				dropped += len(u.Sources) - i
				break
			}
			addr := s.Address
			if addr == "" {
				addr = LocalSource
			}
			st.Sources = append(st.Sources, v1alpha1.Source{Address: addr, FirstSeen: metav1.NewTime(s.FirstSeen), Foreign: s.Foreign})
		}
		st.DroppedSources, st.Sessions = clamp32(dropped), clamp32(u.Sessions)
		st.SourcesSummary = SourcesSummary(st.Sources, int(st.DroppedSources))
		meta.SetStatusCondition(&st.Conditions, usedCondition(u, st.Sources))
	}
}

// notSeen says why a use is not known whole (credential.Usage.Sampled
// false).
const notSeen = "the issuer did not see the sessions of the credential's whole life (it cannot see sessions: its admin lacks pg_read_all_stats, or sampling fails; or it started after the credential)"

// usedCondition is the Used condition of a credential used as u.
func usedCondition(u credential.Usage, sources []v1alpha1.Source) metav1.Condition {
	c := metav1.Condition{Type: v1alpha1.ConditionUsed, Status: metav1.ConditionFalse}
	switch {
	case !u.FirstUsedAt.IsZero():
		c.Status, c.Reason = metav1.ConditionTrue, v1alpha1.ReasonUsed
		c.Message = "first used at " + u.FirstUsedAt.UTC().Format(time.RFC3339)
		if len(sources) > 0 {
			c.Message += " from " + sources[0].Address
		}
		if n := foreign(sources); n > 0 {
			c.Message += fmt.Sprintf("; used from %d address(es) none expected (sources marked foreign): see the pod's CredentialUsedElsewhere events and the audit records with stage=use", n)
		}
		if !u.Sampled {
			c.Message += "; " + notSeen + ": the sources may be incomplete"
		}
	case u.Sampled:
		c.Reason, c.Message = v1alpha1.ReasonNeverUsed, "no session of the credential seen so far"
	default:
		c.Reason = v1alpha1.ReasonNotObserved
		c.Message = notSeen + ": whether the credential was used is not known"
	}
	return c
}

// UsageOf is the use a record's status shows (Used is the other way).
// Sampled is false only where the status says the issuer could not see.
func UsageOf(st v1alpha1.CredentialStatus) credential.Usage {
	u := credential.Usage{Dropped: int(st.DroppedSources), Sessions: int(st.Sessions), Sampled: true}
	if st.FirstUsedAt != nil {
		u.FirstUsedAt = st.FirstUsedAt.Time
	}
	if st.LastUsedAt != nil {
		u.LastUsedAt = st.LastUsedAt.Time
	}
	for _, s := range st.Sources {
		u.Sources = append(u.Sources, credential.Source{Address: s.Address, FirstSeen: s.FirstSeen.Time, Foreign: s.Foreign})
	}
	if c := meta.FindStatusCondition(st.Conditions, v1alpha1.ConditionUsed); c != nil && c.Reason == v1alpha1.ReasonNotObserved {
		u.Sampled = false
	}
	return u
}

// SourcesSummary is sources in one line, for a column of kubectl get:
// the foreign addresses first, each marked "(foreign)", then the others,
// at most three, and "+N" for the rest (dropped ones included). Empty
// when there is none.
func SourcesSummary(sources []v1alpha1.Source, dropped int) string {
	ordered := make([]v1alpha1.Source, 0, len(sources))
	for _, want := range []bool{true, false} {
		for _, s := range sources {
			if s.Foreign == want {
				ordered = append(ordered, s)
			}
		}
	}
	var parts []string
	for i, s := range ordered {
		if i == summaryAddresses {
			break
		}
		if s.Foreign {
			parts = append(parts, s.Address+"(foreign)")
		} else {
			parts = append(parts, s.Address)
		}
	}
	if more := len(ordered) - len(parts) + dropped; more > 0 {
		parts = append(parts, "+"+strconv.Itoa(more))
	}
	return strings.Join(parts, ",")
}

func foreign(sources []v1alpha1.Source) int {
	n := 0
	for _, s := range sources {
		if s.Foreign {
			n++
		}
	}
	return n
}

func timeOrNil(t time.Time) *metav1.Time {
	if t.IsZero() {
		return nil
	}
	return &metav1.Time{Time: t}
}

func clamp32(n int) int32 {
	return int32(max(0, min(n, math.MaxInt32)))
}
