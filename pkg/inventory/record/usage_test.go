package record_test

import (
	"fmt"
	"reflect"
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	v1alpha1 "github.com/ephemeral-secrets/csi-driver/pkg/apis/ephemeralsecrets/v1alpha1"
	"github.com/ephemeral-secrets/csi-driver/pkg/credential"
	"github.com/ephemeral-secrets/csi-driver/pkg/inventory/record"
)

func sources(n int, foreign ...int) []credential.Source {
	at := time.Date(2026, 12, 7, 13, 0, 0, 0, time.UTC)
	var out []credential.Source
	for i := range n {
		out = append(out, credential.Source{Address: fmt.Sprintf("10.0.0.%d", i+1), FirstSeen: at.Add(time.Duration(i) * time.Second)})
	}
	for _, i := range foreign {
		out[i].Foreign = true
	}
	return out
}

// TestUsedStatus: the status of a use, its condition, its bound and its
// summary, and the way back (UsageOf).
func TestUsedStatus(t *testing.T) {
	first := time.Date(2026, 12, 7, 13, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		name        string
		u           credential.Usage
		status      metav1.ConditionStatus
		reason      string
		summary     string
		sources     int
		dropped     int32
		roundTrips  bool
		msgContains string
	}{
		{name: "never used, sampled", u: credential.Usage{Sampled: true},
			status: metav1.ConditionFalse, reason: v1alpha1.ReasonNeverUsed, roundTrips: true},
		{name: "not observed", u: credential.Usage{},
			status: metav1.ConditionFalse, reason: v1alpha1.ReasonNotObserved, roundTrips: true, msgContains: "not known"},
		{name: "used from its pod", u: credential.Usage{FirstUsedAt: first, LastUsedAt: first.Add(time.Minute), Sources: sources(1), Sessions: 2, Sampled: true},
			status: metav1.ConditionTrue, reason: v1alpha1.ReasonUsed, summary: "10.0.0.1", sources: 1, roundTrips: true, msgContains: "from 10.0.0.1"},
		{name: "used elsewhere too", u: credential.Usage{FirstUsedAt: first, LastUsedAt: first, Sources: sources(2, 1), Sessions: 1, Sampled: true},
			status: metav1.ConditionTrue, reason: v1alpha1.ReasonUsed, summary: "10.0.0.2(foreign),10.0.0.1", sources: 2, roundTrips: true,
			msgContains: "1 address(es) none expected"},
		{name: "foreign first, three named", u: credential.Usage{FirstUsedAt: first, Sources: sources(5, 4), Dropped: 2, Sampled: true},
			status: metav1.ConditionTrue, reason: v1alpha1.ReasonUsed, summary: "10.0.0.5(foreign),10.0.0.1,10.0.0.2,+4", sources: 5, dropped: 2, roundTrips: true},
		{name: "beyond the bound", u: credential.Usage{FirstUsedAt: first, Sources: sources(credential.MaxSources + 3), Dropped: 1, Sampled: true},
			status: metav1.ConditionTrue, reason: v1alpha1.ReasonUsed, summary: "10.0.0.1,10.0.0.2,10.0.0.3,+9", sources: credential.MaxSources, dropped: 4},
		{name: "used, blind now", u: credential.Usage{FirstUsedAt: first, Sources: sources(1)},
			status: metav1.ConditionTrue, reason: v1alpha1.ReasonUsed, summary: "10.0.0.1", sources: 1, msgContains: "sources may be incomplete"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var st v1alpha1.CredentialStatus
			record.Used(tc.u)(&st)
			c := meta.FindStatusCondition(st.Conditions, v1alpha1.ConditionUsed)
			if c == nil || c.Status != tc.status || c.Reason != tc.reason || !strings.Contains(c.Message, tc.msgContains) {
				t.Fatalf("condition %+v, want %s %s (%q)", c, tc.status, tc.reason, tc.msgContains)
			}
			if st.SourcesSummary != tc.summary || len(st.Sources) != tc.sources || st.DroppedSources != tc.dropped {
				t.Errorf("summary %q, %d sources, %d dropped; want %q, %d, %d", st.SourcesSummary, len(st.Sources), st.DroppedSources, tc.summary, tc.sources, tc.dropped)
			}
			if (st.FirstUsedAt == nil) != tc.u.FirstUsedAt.IsZero() || (st.LastUsedAt == nil) != tc.u.LastUsedAt.IsZero() || int(st.Sessions) != tc.u.Sessions {
				t.Errorf("times %v %v, sessions %d; from %+v", st.FirstUsedAt, st.LastUsedAt, st.Sessions, tc.u)
			}
			if back := record.UsageOf(st); tc.roundTrips && !reflect.DeepEqual(back, tc.u) {
				t.Errorf("UsageOf(Used(u)) = %+v, want %+v", back, tc.u)
			}
		})
	}
}

// TestUsedStatusReplaces: a later use replaces the earlier one (the
// issuer sends the whole use each time); a Unix-socket session, without
// an address, is "local"; other conditions are kept.
func TestUsedStatusReplaces(t *testing.T) {
	st := v1alpha1.CredentialStatus{Conditions: []metav1.Condition{{Type: v1alpha1.ConditionIssued, Status: metav1.ConditionTrue, Reason: "Issued"}}}
	record.Used(credential.Usage{Sampled: true})(&st)
	at := time.Date(2026, 12, 7, 13, 0, 0, 0, time.UTC)
	record.Used(credential.Usage{FirstUsedAt: at, LastUsedAt: at, Sources: []credential.Source{{FirstSeen: at}}, Sampled: true})(&st)
	if len(st.Conditions) != 2 || !meta.IsStatusConditionTrue(st.Conditions, v1alpha1.ConditionUsed) || !meta.IsStatusConditionTrue(st.Conditions, v1alpha1.ConditionIssued) {
		t.Errorf("conditions %+v", st.Conditions)
	}
	if len(st.Sources) != 1 || st.Sources[0].Address != record.LocalSource || st.SourcesSummary != record.LocalSource {
		t.Errorf("sources %+v, summary %q", st.Sources, st.SourcesSummary)
	}
}
