package credential

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// TestRecordJSON: the record's field names, order and omissions, which
// `ephemeral-secrets-csi inventory --json` prints (pkg/lease's golden
// test checks the command's whole output).
func TestRecordJSON(t *testing.T) {
	at := time.Date(2026, 12, 7, 7, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		name string
		r    Record
		want string
	}{{
		name: "empty: what is never omitted",
		want: `{"volumeID":"","pod":{"namespace":"","name":"","uid":"","serviceAccount":""},"class":"","provider":"","leaseID":"","state":""}`,
	}, {
		name: "every field",
		r: Record{
			VolumeID: "csi-1", Pod: provider.Pod{Namespace: "shop", Name: "web-0", UID: "u1", ServiceAccount: "web"},
			Node: "n1", Class: "shop/db", Provider: "postgres", Role: "main/app", Name: "esc_shop_web_0",
			LeaseID: "L1", Task: "job-1", State: "published",
			IssuedAt: at, ExpiresAt: at.Add(time.Hour), RenewedAt: at.Add(time.Minute),
		},
		want: `{"volumeID":"csi-1","pod":{"namespace":"shop","name":"web-0","uid":"u1","serviceAccount":"web"},"node":"n1","class":"shop/db","provider":"postgres","role":"main/app","name":"esc_shop_web_0","leaseID":"L1","task":"job-1","state":"published","issuedAt":"2026-12-07T07:00:00Z","expiresAt":"2026-12-07T08:00:00Z","renewedAt":"2026-12-07T07:01:00Z"}`,
	}} {
		t.Run(tc.name, func(t *testing.T) {
			b, err := json.Marshal(tc.r)
			if err != nil {
				t.Fatal(err)
			}
			if string(b) != tc.want {
				t.Errorf("got\n%s\nwant\n%s", b, tc.want)
			}
			var back Record
			if err := json.Unmarshal(b, &back); err != nil || back != tc.r {
				t.Errorf("decoded back as %+v, %v", back, err)
			}
		})
	}
}
