package audit

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/credential"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// TestOf: the audit record of a credential says who holds it, what it is
// and until when, in UTC, in the trail's field names; its state, node,
// backend name and other times are not the trail's.
func TestOf(t *testing.T) {
	at := time.Date(2026, 12, 7, 8, 0, 0, 0, time.FixedZone("CET", 3600))
	pod := provider.Pod{Namespace: "shop", Name: "web-0", UID: "u1", ServiceAccount: "web"}
	for _, tc := range []struct {
		name string
		c    credential.Record
		want string
	}{{
		name: "every field",
		c: credential.Record{
			VolumeID: "csi-1", Pod: pod, Node: "n1", Class: "shop/db", Provider: "postgres", Role: "main/app",
			Name: "esc_shop_web_0", LeaseID: "L1", Task: "job-1", State: "published",
			IssuedAt: at.Add(-time.Hour), ExpiresAt: at, RenewedAt: at.Add(-time.Minute),
		},
		want: `{"time":"0001-01-01T00:00:00Z","stage":"issue","volume_id":"csi-1","pod":{"namespace":"shop","name":"web-0","uid":"u1","serviceAccount":"web"},"class":"shop/db","provider":"postgres","role":"main/app","lease_id":"L1","task":"job-1","expires_at":"2026-12-07T07:00:00Z","outcome":"success"}`,
	}, {
		name: "no expiry, no task",
		c:    credential.Record{VolumeID: "csi-2", Pod: pod, Class: "shop/db", Provider: "vault", LeaseID: "L2"},
		want: `{"time":"0001-01-01T00:00:00Z","stage":"issue","volume_id":"csi-2","pod":{"namespace":"shop","name":"web-0","uid":"u1","serviceAccount":"web"},"class":"shop/db","provider":"vault","lease_id":"L2","outcome":"success"}`,
	}} {
		t.Run(tc.name, func(t *testing.T) {
			r := Of(tc.c)
			r.Stage, r.Outcome = Issue, Success
			b, err := json.Marshal(r)
			if err != nil {
				t.Fatal(err)
			}
			if string(b) != tc.want {
				t.Errorf("got\n%s\nwant\n%s", b, tc.want)
			}
		})
	}
}
