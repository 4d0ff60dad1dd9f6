// Package alerts runs the chart's alerts (files/prometheus-rules.yaml, as
// the PrometheusRule renders them) with promtool on series scraped from
// the real driver and issuer: a Recording scrapes their /metrics as
// Prometheus would, labels the series as the chart's ServiceMonitors do,
// and writes them as promtool's input_series, one scrape a step of virtual
// time.
package alerts

import (
	"fmt"
	"io"
	"maps"
	"math"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// Target is one scrape target as a ServiceMonitor makes it: where its
// /metrics is and the labels Prometheus puts on its series and on its
// up (job, node, instance, ...).
type Target struct {
	URL    string
	Labels map[string]string
}

// Recording is a run of scrapes of a set of targets, each scrape one step
// of Interval in virtual time. A real run lasts seconds where an alert
// needs minutes: every step is Interval apart in virtual time, whatever
// the real time between the scrapes, and gauges that are ages (Ages) are
// multiplied by Dilation, the virtual time per real time, so that an age
// grows as the virtual clock does. Counters count events and are kept
// as they are.
type Recording struct {
	Interval time.Duration
	Dilation float64
	// Ages are the names of the gauges that measure how long ago
	// something started.
	Ages []string
	// Keep says which metric names are recorded (besides up).
	Keep func(name string) bool

	steps []map[string]float64
}

// Scrape scrapes every target once, as one step. A target that does not
// answer (or answers other than 200) has up 0 and its series go stale,
// as Prometheus marks them.
func (r *Recording) Scrape(targets []Target) {
	step := map[string]float64{}
	for _, t := range targets {
		samples, err := scrape(t.URL)
		up := 1.0
		if err != nil {
			up = 0
		}
		step[seriesName("up", t.Labels)] = up
		for _, s := range samples {
			name := string(s.Metric[model.MetricNameLabel])
			if r.Keep != nil && !r.Keep(name) {
				continue
			}
			labels := map[string]string{}
			for k, v := range s.Metric {
				if k != model.MetricNameLabel {
					labels[string(k)] = string(v)
				}
			}
			// honorLabels: the scraped labels win over the target's.
			for k, v := range t.Labels {
				if _, ok := labels[k]; !ok {
					labels[k] = v
				}
			}
			v := float64(s.Value)
			if slices.Contains(r.Ages, name) {
				v *= r.Dilation
			}
			step[seriesName(name, labels)] = v
		}
	}
	r.steps = append(r.steps, step)
}

// Steps is the number of scrapes so far.
func (r *Recording) Steps() int { return len(r.steps) }

// Value is the value of series (as seriesName writes it) at step i, and
// whether it had one.
func (r *Recording) Value(i int, series string) (float64, bool) {
	v, ok := r.steps[i][series]
	return v, ok
}

// Series is one of promtool's input_series.
type Series struct {
	Series string `json:"series"`
	Values string `json:"values"`
}

// InputSeries is the recording as promtool's input_series: a value per
// step, "stale" where a series that had a value has none any more (its
// target failed, or it left the exposition), "_" where it has none yet.
func (r *Recording) InputSeries() []Series {
	names := map[string]bool{}
	for _, s := range r.steps {
		for n := range s {
			names[n] = true
		}
	}
	var out []Series
	for _, n := range slices.Sorted(maps.Keys(names)) {
		vals := make([]string, len(r.steps))
		for i, s := range r.steps {
			v, ok := s[n]
			before := false
			if i > 0 {
				_, before = r.steps[i-1][n]
			}
			switch {
			case ok:
				vals[i] = formatValue(v)
			case before:
				vals[i] = "stale"
			default:
				vals[i] = "_"
			}
		}
		out = append(out, Series{Series: n, Values: strings.Join(vals, " ")})
	}
	return out
}

func formatValue(v float64) string {
	switch {
	case math.IsNaN(v):
		return "NaN"
	case math.IsInf(v, 1):
		return "Inf"
	case math.IsInf(v, -1):
		return "-Inf"
	}
	return strconv.FormatFloat(v, 'g', -1, 64)
}

// seriesName is a series in PromQL's notation, its labels sorted.
func seriesName(name string, labels map[string]string) string {
	var b strings.Builder
	b.WriteString(name)
	b.WriteByte('{')
	for i, k := range slices.Sorted(maps.Keys(labels)) {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, "%s=%q", k, labels[k])
	}
	b.WriteByte('}')
	return b.String()
}

var client = &http.Client{Timeout: 5 * time.Second}

// scrape fetches and parses a text exposition into samples (histograms
// as their _bucket, _sum and _count series).
func scrape(url string) (model.Vector, error) {
	resp, err := client.Get(url)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		_, _ = io.Copy(io.Discard, resp.Body)
		return nil, fmt.Errorf("%s: %s", url, resp.Status)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", url, err)
	}
	var all model.Vector
	for _, name := range slices.Sorted(maps.Keys(fams)) {
		v, err := expfmt.ExtractSamples(&expfmt.DecodeOptions{Timestamp: model.Now()}, fams[name])
		if err != nil {
			return nil, err
		}
		all = append(all, v...)
	}
	return all, nil
}
