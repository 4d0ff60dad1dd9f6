// Command issuer measures the cluster issuer under a burst: N publishes
// (mints) at once from simulated nodes, each node plugin with its own
// bound token and HTTPS connections, through two replicas of the real
// "ephemeral-secrets-csi issuer" (real kube-apiserver: TokenReview and
// a fresh GET of each pod; real PostgreSQL). It samples pg_stat_activity
// for the admin connections in use, and times mints in the driver's own
// process (the issuer without a cluster) against mints through the
// issuer in the same run. It prints a table and writes JSON. Run it
// through "make bench".
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/yaml"

	"github.com/ephemeral-secrets/csi-driver/pkg/issuer"
	pgengine "github.com/ephemeral-secrets/csi-driver/pkg/issuer/postgres"
	"github.com/ephemeral-secrets/csi-driver/pkg/issuer/remote"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider/postgres"
	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/issuertest"
	"github.com/ephemeral-secrets/csi-driver/test/kube"
	"github.com/ephemeral-secrets/csi-driver/test/pgtest"
)

func main() {
	out := flag.String("out", "bench-issuer-results.json", "where the JSON results go")
	burst := flag.Int("burst", 500, "publishes in the burst")
	nodes := flag.Int("nodes", 50, "simulated nodes the burst comes from")
	seq := flag.Int("seq", 100, "mints one at a time, in-process and through the issuer")
	qps := flag.String("kube-api-qps", "", "the issuers' --kube-api-qps (burst: twice it); empty: their default")
	flag.Parse()
	if err := run(*out, *burst, *nodes, *seq, *qps); err != nil {
		fmt.Fprintln(os.Stderr, "bench issuer:", err)
		os.Exit(1)
	}
}

type latency struct {
	P50      float64 `json:"p50_ms"`
	P99      float64 `json:"p99_ms"`
	Samples  int     `json:"samples"`
	Failures int     `json:"failures,omitempty"`
	WallS    float64 `json:"wall_s,omitempty"`
	// AdminConns is the most admin connections pg_stat_activity showed
	// at once during the run.
	AdminConns int `json:"max_admin_connections"`
}

type results struct {
	Burst      int                `json:"burst"`
	KubeAPIQPS string             `json:"issuer_kube_api_qps,omitempty"`
	Nodes      int                `json:"nodes"`
	Replicas   int                `json:"issuer_replicas"`
	MaxConns   int                `json:"max_conns_per_replica"`
	Mint       map[string]latency `json:"mint"`
	Drop       map[string]latency `json:"drop"`
	Machine    struct {
		CPUs int    `json:"cpus"`
		Go   string `json:"go"`
		Date string `json:"date"`
	} `json:"machine"`
}

const (
	replicas = 2
	maxConns = 4
)

func backendConfig(adminURL string) string {
	return fmt.Sprintf(`postgres:
  connections:
    main:
      url: %s
      maxConns: %d
      roles:
        app:
          defaultTTL: 1h
          maxTTL: 2h
          creationStatements:
            - CREATE ROLE "{{.Name}}" LOGIN PASSWORD '{{.Password}}' VALID UNTIL '{{.Expiration}}'
          allowed:
            - namespace: shop
              serviceAccount: orders
`, adminURL, maxConns)
}

// The application names of the two paths' admin connections.
const (
	issuerApp = "esc-issuer"
	localApp  = "esc-in-process"
)

var params = map[string]string{"connection": "main", "role": "app"}

func run(out string, burst, nodes, seq int, qps string) error {
	ctx := context.Background()
	var r results
	r.Burst, r.Nodes, r.Replicas, r.MaxConns, r.KubeAPIQPS = burst, nodes, replicas, maxConns, qps
	r.Mint, r.Drop = map[string]latency{}, map[string]latency{}
	r.Machine.CPUs, r.Machine.Go, r.Machine.Date = runtime.NumCPU(), runtime.Version(), time.Now().UTC().Format(time.RFC3339)

	dir, err := os.MkdirTemp("", "esc-bench-issuer-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	fmt.Println("building the driver ...")
	bin, err := harness.Build(dir)
	if err != nil {
		return err
	}
	pg, err := pgtest.Start()
	if err != nil {
		return err
	}
	defer pg.Close()
	cluster, err := kube.Start()
	if err != nil {
		return err
	}
	defer cluster.Stop()
	acfg := cluster.Config()
	acfg.QPS, acfg.Burst = 1000, 2000 // making the pods is not what is measured
	admin, err := kubernetes.NewForConfig(acfg)
	if err != nil {
		return err
	}
	objs := issuertest.Cluster{CS: admin}
	issuerKC, driverKC, err := objs.Setup(ctx, cluster, dir)
	if err != nil {
		return err
	}
	rc, err := clientcmd.BuildConfigFromFlags("", driverKC)
	if err != nil {
		return err
	}
	driverCS, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return err
	}
	backends := filepath.Join(dir, "backends.yaml")
	// Each path's admin pool names itself, so pg_stat_activity tells them apart.
	cfgText := backendConfig(pg.AdminURL() + "&application_name=" + issuerApp)
	if err := os.WriteFile(backends, []byte(cfgText), 0o600); err != nil {
		return err
	}

	var issuers []*issuertest.Issuer
	for i := range replicas {
		flags := []string{"-v", "0"}
		if qps != "" {
			q, err := strconv.Atoi(qps)
			if err != nil {
				return fmt.Errorf("--kube-api-qps: %w", err)
			}
			flags = append(flags, "--kube-api-qps", qps, "--kube-api-burst", strconv.Itoa(2*q))
		}
		is, err := issuertest.StartIssuer(bin, fmt.Sprintf("issuer-%d", i+1), "", issuerKC, backends, flags...)
		if err != nil {
			return err
		}
		defer is.Stop()
		issuers = append(issuers, is)
	}

	fmt.Printf("%d nodes, %d pods ...\n", nodes, burst+seq)
	type pod struct {
		p    provider.Pod
		node int
	}
	pods := make([]pod, burst+seq)
	errc := make(chan error, len(pods))
	var wg sync.WaitGroup
	sem := make(chan struct{}, 16)
	for i := range pods {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			node := i % nodes
			p, _, err := objs.TenantPod(ctx, "shop", fmt.Sprintf("orders-%d", i), "orders", fmt.Sprintf("node-%d", node), "orders-db")
			pods[i] = pod{p, node}
			errc <- err
		}()
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		if err != nil {
			return err
		}
	}
	// One node plugin per node: its own token and HTTPS client, on the
	// replica a Service would have sent it to.
	plugins := make([]*postgres.Provider, nodes)
	for n := range nodes {
		dp, err := objs.Node(ctx, fmt.Sprintf("node-%d", n))
		if err != nil {
			return err
		}
		tok, err := objs.Token(ctx, dp, remote.Audience)
		if err != nil {
			return err
		}
		path, err := issuertest.WriteToken(dir, fmt.Sprintf("token-%d", n), tok)
		if err != nil {
			return err
		}
		c, err := remote.NewClient(remote.ClientOptions{URL: issuers[n%replicas].URL(), TokenFile: path,
			Roots: remote.RootsConfigMap(driverCS, issuertest.IssuerNamespace, "ephemeral-secrets-csi-issuer-ca")})
		if err != nil {
			return err
		}
		plugins[n] = postgres.NewNode(c)
	}
	// Every node plugin calls once before the measures: its first call
	// (TLS handshake, the issuer's ConfigMap, a TokenReview) is a node's
	// start-up, not a publish.
	fmt.Println("waiting for the issuers; each node's first call ...")
	for n := range nodes {
		deadline := time.Now().Add(time.Minute)
		for plugins[n].Revoke(ctx, provider.Lease{ID: "probe", Params: params}) != nil {
			if time.Now().After(deadline) {
				return fmt.Errorf("issuer %d does not serve; log %s", n%replicas+1, issuers[n%replicas].LogFile)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}

	// The same issuer code in this process, as the driver runs it
	// without a cluster: its own admin pool of the same size.
	var cfg struct {
		Postgres pgengine.Config `json:"postgres"`
	}
	if err := yaml.UnmarshalStrict([]byte(backendConfig(pg.AdminURL()+"&application_name="+localApp)), &cfg); err != nil {
		return err
	}
	local, err := issuer.New(issuer.Options{Config: cfg.Postgres})
	if err != nil {
		return err
	}
	defer local.Close()
	inProcess := postgres.NewNode(local.Local())

	sampler, err := pgx.Connect(ctx, pg.AdminURL())
	if err != nil {
		return err
	}
	defer sampler.Close(ctx)
	// watch samples the admin connections of app until the function it
	// returns is called, which returns the most seen at once.
	watch := func(app string) func() int {
		var peak atomic.Int64
		stop := make(chan struct{})
		done := make(chan struct{})
		go func() {
			defer close(done)
			for {
				var n int64
				if err := sampler.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity
					WHERE application_name = $1 AND backend_type = 'client backend'`, app).Scan(&n); err == nil && n > peak.Load() {
					peak.Store(n)
				}
				select {
				case <-stop:
					return
				case <-time.After(10 * time.Millisecond):
				}
			}
		}()
		return func() int { close(stop); <-done; return int(peak.Load()) }
	}

	type job struct {
		lease string
		pod   pod
	}
	var live []provider.Lease
	var liveMu sync.Mutex
	// raw keeps each row's samples, so that a row measured in blocks has
	// exact percentiles.
	raw := map[string][]time.Duration{}
	rawFails := map[string]int{}
	appOf := func(row string) string {
		if strings.HasPrefix(row, "in-process") {
			return localApp
		}
		return issuerApp
	}
	mintAll := func(name string, jobs []job, concurrency int, via func(pod) *postgres.Provider) error {
		stop := watch(appOf(name))
		ds, fails, wall := timeAll(len(jobs), concurrency, func(i int) error {
			l, err := via(jobs[i].pod).Issue(ctx, provider.Request{LeaseID: jobs[i].lease, Class: "shop/orders-db", Params: params, Pod: jobs[i].pod.p})
			if err == nil {
				l.ID, l.Params = jobs[i].lease, params
				liveMu.Lock()
				live = append(live, l)
				liveMu.Unlock()
			}
			return err
		})
		prev := r.Mint[name]
		raw[name] = append(raw[name], ds...)
		rawFails[name] += fails
		l := summarize(raw[name], rawFails[name])
		l.WallS, l.AdminConns = prev.WallS+wall.Seconds(), max(prev.AdminConns, stop())
		r.Mint[name] = l
		if fails > 0 {
			return fmt.Errorf("%s: %d mints failed", name, fails)
		}
		return nil
	}
	dropAll := func(name string, concurrency int, via func(i int) *postgres.Provider) error {
		stop := watch(appOf(name))
		ds, fails, wall := timeAll(len(live), concurrency, func(i int) error { return via(i).Revoke(ctx, live[i]) })
		l := summarize(ds, fails)
		l.WallS, l.AdminConns = wall.Seconds(), stop()
		r.Drop[name] = l
		live = nil
		if fails > 0 {
			return fmt.Errorf("%s: %d drops failed", name, fails)
		}
		return nil
	}
	jobs := func(prefix string, from, n int) []job {
		js := make([]job, n)
		for i := range js {
			js[i] = job{fmt.Sprintf("%s-%d", prefix, i), pods[from+i]}
		}
		return js
	}
	viaIssuer := func(p pod) *postgres.Provider { return plugins[p.node] }
	viaLocal := func(pod) *postgres.Provider { return inProcess }

	fmt.Println("warm-up ...")
	if err := mintAll("warm-up", jobs("warm", burst, min(seq, 20)), 4, viaIssuer); err != nil {
		return err
	}
	if err := dropAll("warm-up", 4, func(int) *postgres.Provider { return inProcess }); err != nil {
		return err
	}
	delete(r.Mint, "warm-up")
	delete(r.Drop, "warm-up")
	// One at a time, alternating paths in blocks, so both see the same machine.
	fmt.Printf("%d mints one at a time, in-process and through the issuer ...\n", seq)
	for b := 0; b < seq; b += 10 {
		n := min(10, seq-b)
		for _, p := range []struct {
			name string
			via  func(pod) *postgres.Provider
		}{{"in-process c1", viaLocal}, {"issuer c1", viaIssuer}} {
			if err := mintAll(p.name, jobs(fmt.Sprintf("%s-%d", p.name[:5], b), burst+b, n), 1, p.via); err != nil {
				return err
			}
		}
	}
	if err := dropAll("in-process c1 cleanup", 4, func(int) *postgres.Provider { return inProcess }); err != nil {
		return err
	}
	delete(r.Drop, "in-process c1 cleanup")

	fmt.Printf("burst: %d mints at once from %d nodes through the issuer ...\n", burst, nodes)
	if err := mintAll("issuer burst", jobs("burst", 0, burst), burst, viaIssuer); err != nil {
		return err
	}
	fmt.Printf("burst: %d drops at once through the issuer ...\n", burst)
	byLease := map[string]int{}
	for i := range burst {
		byLease[fmt.Sprintf("burst-%d", i)] = pods[i].node
	}
	if err := dropAll("issuer burst", burst, func(i int) *postgres.Provider { return plugins[byLease[live[i].ID]] }); err != nil {
		return err
	}
	fmt.Printf("burst: %d mints at once in-process ...\n", burst)
	if err := mintAll("in-process burst", jobs("local-burst", 0, burst), burst, viaLocal); err != nil {
		return err
	}
	if err := dropAll("in-process burst", burst, func(int) *postgres.Provider { return inProcess }); err != nil {
		return err
	}
	if n, err := pg.CountRoles(ctx, "esc_"); err != nil || n != 0 {
		return fmt.Errorf("%d roles left after the run (%v)", n, err)
	}

	fmt.Printf("\n%-18s %-6s %9s %9s %8s %7s %s\n", "", "", "p50 ms", "p99 ms", "wall s", "fails", "max admin conns")
	for _, row := range []struct{ verb, name string }{
		{"mint", "in-process c1"}, {"mint", "issuer c1"}, {"mint", "issuer burst"}, {"drop", "issuer burst"},
		{"mint", "in-process burst"}, {"drop", "in-process burst"},
	} {
		l := r.Mint[row.name]
		if row.verb == "drop" {
			l = r.Drop[row.name]
		}
		fmt.Printf("%-18s %-6s %9.2f %9.2f %8.2f %7d %d\n", row.name, row.verb, l.P50, l.P99, l.WallS, l.Failures, l.AdminConns)
	}
	fmt.Printf("(admin connections: the issuer's %d replicas x maxConns %d = %d at most; in-process, one pool of %d)\n",
		replicas, maxConns, replicas*maxConns, maxConns)
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(out, append(data, '\n'), 0o644)
}

func timeAll(n, concurrency int, f func(i int) error) ([]time.Duration, int, time.Duration) {
	ds := make([]time.Duration, n)
	var fails atomic.Int64
	var firstErr error
	var errMu sync.Mutex
	start := time.Now()
	var wg sync.WaitGroup
	sem := make(chan struct{}, concurrency)
	for i := range n {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			t := time.Now()
			if err := f(i); err != nil {
				fails.Add(1)
				errMu.Lock()
				if firstErr == nil {
					firstErr = err
				}
				errMu.Unlock()
				ds[i] = -1
				return
			}
			ds[i] = time.Since(t)
		}()
	}
	wg.Wait()
	if firstErr != nil {
		fmt.Println("  first failure:", firstErr)
	}
	ok := ds[:0]
	for _, d := range ds {
		if d >= 0 {
			ok = append(ok, d)
		}
	}
	return ok, int(fails.Load()), time.Since(start)
}

func summarize(ds []time.Duration, fails int) latency {
	l := latency{Samples: len(ds), Failures: fails}
	if len(ds) == 0 {
		return l
	}
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	pct := func(p float64) float64 {
		return float64(s[min(len(s)-1, int(p*float64(len(s))))].Microseconds()) / 1000
	}
	l.P50, l.P99 = pct(0.5), pct(0.99)
	return l
}
