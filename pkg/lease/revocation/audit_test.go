package revocation

import (
	"bytes"
	"errors"
	"regexp"
	"testing"
	"time"

	clocktesting "k8s.io/utils/clock/testing"

	"github.com/ephemeral-secrets/csi-driver/pkg/audit"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// TestAuditRecordsKeepTheirBytes: the queue's audit records of an entry
// are the bytes the driver wrote before they were rendered from the
// entry's credential record: a field renamed, dropped or moved fails it.
func TestAuditRecordsKeepTheirBytes(t *testing.T) {
	at := time.Date(2026, 12, 7, 7, 30, 0, 0, time.UTC)
	var out bytes.Buffer
	q := New(Options{Audit: audit.New(&out), Clock: clocktesting.NewFakeClock(at)})
	paris := time.FixedZone("CET", 3600)
	e := Entry{
		Lease: provider.Lease{
			ID: "L-OLD", Provider: "vault", Role: "db/app", Handle: map[string]string{"accessor": "secret-handle"},
			IssuedAt: at.Add(-time.Hour).In(paris), ExpiresAt: at.Add(30 * time.Minute).In(paris),
		},
		VolumeID: "csi-0123abcd", Class: "shop/db", Reason: "rotated", Task: "job-0",
		Pod:        provider.Pod{Namespace: "shop", Name: "web-0", UID: "6f1c2a3e-uid", ServiceAccount: "web"},
		EnqueuedAt: at, Attempts: 2, LastError: "connection refused",
	}
	q.audit(e, audit.Revoke, audit.Success, nil)
	q.audit(e, audit.Failure, audit.Unrevocable, errors.New("refused"))
	bare := Entry{Lease: provider.Lease{ID: "L-EARLY", Provider: "postgres"}, VolumeID: "gone", Reason: "unpublished"}
	q.audit(bare, audit.Failure, audit.Error, errors.New("connection refused"))

	want := `{"time":"T","stage":"revoke","volume_id":"csi-0123abcd","pod":{"namespace":"shop","name":"web-0","uid":"6f1c2a3e-uid","serviceAccount":"web"},"class":"shop/db","provider":"vault","role":"db/app","lease_id":"L-OLD","task":"job-0","expires_at":"2026-12-07T08:00:00Z","outcome":"success","detail":"rotated","lifetime":"1h0m0s"}
{"time":"T","stage":"failure","volume_id":"csi-0123abcd","pod":{"namespace":"shop","name":"web-0","uid":"6f1c2a3e-uid","serviceAccount":"web"},"class":"shop/db","provider":"vault","role":"db/app","lease_id":"L-OLD","task":"job-0","expires_at":"2026-12-07T08:00:00Z","outcome":"unrevocable","error":"refused","detail":"rotated; the backend cannot revoke it: it stays valid until expires_at","lifetime":"1h0m0s"}
{"time":"T","stage":"failure","volume_id":"gone","pod":{"namespace":"","name":"","uid":"","serviceAccount":""},"provider":"postgres","lease_id":"L-EARLY","outcome":"error","error":"connection refused","detail":"unpublished"}
`
	// The logger stamps the time of writing.
	got := regexp.MustCompile(`(?m)^\{"time":"[^"]*",`).ReplaceAllString(out.String(), `{"time":"T",`)
	if got != want {
		t.Fatalf("audit records\n%s\nwant\n%s", got, want)
	}
}
