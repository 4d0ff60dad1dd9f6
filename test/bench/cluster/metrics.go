package main

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/ephemeral-secrets/csi-driver/test/node"
)

// histogram names one series of a histogram the release's pods export:
// the pods of a component, their metrics port, the family and a label.
type histogram struct {
	component, port, family, label, value string
}

// The two the burst reads: the node plugin's NodePublishVolume (kubelet's
// call, the mint included) and the issuer's mint (both replicas).
var (
	publishHistogram = histogram{"node", "9810", "ephemeral_secrets_csi_operation_duration_seconds", "method", "NodePublishVolume"}
	mintHistogram    = histogram{"issuer", "9811", "ephemeral_secrets_issuer_request_duration_seconds", "verb", "mint"}
)

// totals is a histogram's count and sum, over every pod of its component.
type totals struct {
	count   uint64
	seconds float64
}

// Timing is the time one histogram observed over a burst.
type Timing struct {
	Calls uint64 `json:"calls"`
	// MeanMs is the time observed over the burst, divided by the volumes
	// published (NodePublishVolume: kubelet's republishes, quick and
	// uncounted here, are in the time) or by the calls (the mint).
	MeanMs float64 `json:"meanMs"`
}

// since is what was observed after before, its mean over per (0: over
// the calls).
func (t totals) since(before totals, per int) Timing {
	n := t.count - before.count
	if per == 0 {
		per = int(n)
	}
	if per == 0 {
		return Timing{}
	}
	return Timing{Calls: n, MeanMs: (t.seconds - before.seconds) / float64(per) * 1000}
}

// read scrapes every running pod of the histogram's component (the bench
// runs in the node's network: pod addresses are reachable).
func (h histogram) read(ctx context.Context, clients kubernetes.Interface) (totals, error) {
	pods, err := clients.CoreV1().Pods(node.Namespace).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=" + h.component})
	if err != nil {
		return totals{}, err
	}
	var t totals
	client := &http.Client{Timeout: 10 * time.Second}
	for _, p := range pods.Items {
		if p.Status.PodIP == "" {
			continue
		}
		url := "http://" + net.JoinHostPort(p.Status.PodIP, h.port) + "/metrics"
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return totals{}, err
		}
		resp, err := client.Do(req)
		if err != nil {
			return totals{}, err
		}
		parser := expfmt.NewTextParser(model.UTF8Validation)
		fams, err := parser.TextToMetricFamilies(resp.Body)
		resp.Body.Close()
		if err != nil {
			return totals{}, fmt.Errorf("%s: %w", url, err)
		}
		fam := fams[h.family]
		if fam == nil {
			continue // nothing observed yet
		}
		for _, m := range fam.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == h.label && l.GetValue() == h.value {
					t.count += m.GetHistogram().GetSampleCount()
					t.seconds += m.GetHistogram().GetSampleSum()
				}
			}
		}
	}
	return t, nil
}

// String is how the table prints it: the mean, and the calls if known.
func (t Timing) String() string {
	s := strconv.FormatFloat(t.MeanMs, 'f', 0, 64) + " ms"
	if t.Calls > 0 {
		s += " ×" + strconv.FormatUint(t.Calls, 10)
	}
	return s
}
