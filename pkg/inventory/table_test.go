package inventory_test

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"slices"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"

	"github.com/ephemeral-secrets/csi-driver/pkg/inventory"
)

// TestKubectlGetIsTheInventory asks the API server for the table kubectl
// prints: the columns a person wants, filled from the record.
func TestKubectlGetIsTheInventory(t *testing.T) {
	ns := namespace(t)
	pod := newPod(t, ns, "orders")
	e := entryFor(pod, "node-7", ns+"-orders-tablerow")
	record(t, inventory.NewRecorder(issuerInv, nil), e)

	transport, err := rest.TransportFor(cluster.Config())
	if err != nil {
		t.Fatal(err)
	}
	req, err := http.NewRequestWithContext(context.Background(), http.MethodGet,
		cluster.URL+"/apis/ephemeral-secrets.csi.dev/v1alpha1/namespaces/"+ns+"/credentials", nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
	resp, err := (&http.Client{Transport: transport, Timeout: 10 * time.Second}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	var table metav1.Table
	if err := json.Unmarshal(body, &table); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("%s: %v %s", resp.Status, err, body)
	}
	var names []string
	for _, c := range table.ColumnDefinitions {
		if c.Priority == 0 {
			names = append(names, c.Name)
		}
	}
	if want := []string{"Name", "Pod", "Node", "Provider", "Role", "State", "Expires", "Last-Used", "Sources", "Age"}; !slices.Equal(names, want) {
		t.Errorf("columns %v, want %v", names, want)
	}
	if len(table.Rows) != 1 {
		t.Fatalf("%d rows", len(table.Rows))
	}
	want := []any{inventory.Name(e.LeaseID), pod.Name, "node-7", "postgres", "main/orders", "Issued", e.ExpiresAt.UTC().Format(time.RFC3339)}
	if got := table.Rows[0].Cells[:len(want)]; !slices.Equal(got, want) {
		t.Errorf("row %v, want %v", got, want)
	}
}
