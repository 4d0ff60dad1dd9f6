// Command issuer measures the cluster issuer under a burst: N publishes
// (mints) at once from simulated nodes, each node plugin with its own
// bound token and HTTPS connections, through two replicas of the real
// "ephemeral-secrets-csi issuer" (real kube-apiserver: TokenReview, the
// issuers' pod caches, each mint's Credential; real PostgreSQL). It
// samples pg_stat_activity for the admin connections in use, and times
// mints in the driver's own process (the issuer without a cluster)
// against mints through the issuer in the same run, counting the API
// server's requests per mint. It prints a table and writes JSON. Run it
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
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/yaml"

	v1alpha1 "github.com/ephemeral-secrets/csi-driver/pkg/apis/ephemeralsecrets/v1alpha1"
	"github.com/ephemeral-secrets/csi-driver/pkg/inventory"
	"github.com/ephemeral-secrets/csi-driver/pkg/issuer"
	pgengine "github.com/ephemeral-secrets/csi-driver/pkg/issuer/postgres"
	"github.com/ephemeral-secrets/csi-driver/pkg/issuer/remote"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider/postgres"
	"github.com/ephemeral-secrets/csi-driver/test/bench/resident"
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
	rounds := flag.Int("rounds", 3, "rounds of every row; the table gives each figure's median over them")
	gap := flag.Duration("c1-gap", 0, "pause after each mint of the c1 rows, both paths (0: back to back; the issuer writes each mint's status once mints pause for 20 ms, so a pause longer than that lets the writes go between mints)")
	durable := flag.Bool("postgres-fsync", true, "PostgreSQL syncs its commits, as in production and as the API server's etcd does (false: the tests' server, which does not sync, against an etcd that does)")
	flag.Parse()
	if err := run(*out, *burst, *nodes, *seq, *rounds, *qps, *gap, *durable); err != nil {
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

// round is one round's figures (or their medians over the rounds).
type round struct {
	Mint map[string]latency `json:"mint"`
	Drop map[string]latency `json:"drop"`
	// C1Ratio is the issuer's p50 at concurrency 1 over the in-process one.
	C1Ratio float64 `json:"c1_p50_ratio"`
	// C1API is the API server's requests per mint of the issuer's c1 row.
	C1API c1Cost `json:"c1_api_requests_per_mint"`
	// Records is how many Credentials of the issuer burst were there when
	// its last mint answered; Recorded that it was all of them (else the
	// burst row is void).
	Records  int  `json:"burst_records_at_last_answer"`
	Recorded bool `json:"burst_all_recorded"`
	// StatusLagS is how long after the last answer every Credential of
	// the burst said Issued (its status is written off the mint's path).
	StatusLagS float64 `json:"burst_status_issued_after_s"`
	API        apiCost `json:"burst_api_requests_per_mint"`
}

// c1Cost is the API server's requests per mint one at a time: the
// TokenReviews (a node's first call after its cached review expired),
// the pod reads (a pod its cache did not hold) and the Credential writes.
type c1Cost struct {
	Reviews    float64 `json:"token_reviews"`
	PodReads   float64 `json:"pod_reads"`
	CredWrites float64 `json:"credential_writes"`
}

// apiCost is the API server's requests per mint of the issuer burst
// (apiserver_request_total): until the last answer, and once every
// status is written.
type apiCost struct {
	CredWritesPath float64 `json:"credential_writes_until_answered"`
	CredReadsPath  float64 `json:"credential_reads_until_answered"`
	PodReadsPath   float64 `json:"pod_reads_until_answered"`
	CredWritesAll  float64 `json:"credential_writes_with_status"`
}

type results struct {
	Burst   int     `json:"burst"`
	C1GapMS float64 `json:"c1_gap_ms,omitempty"`
	// PostgresFsync says whether PostgreSQL synced its commits (the
	// API server's etcd always does).
	PostgresFsync bool   `json:"postgres_fsync"`
	KubeAPIQPS    string `json:"issuer_kube_api_qps,omitempty"`
	Nodes         int    `json:"nodes"`
	Replicas      int    `json:"issuer_replicas"`
	MaxConns      int    `json:"max_conns_per_replica"`
	Median        round  `json:"median"`
	// IssuerMemory is each replica's resident memory at the end (its pod
	// cache holding the run's pods, its Credential informer the run's
	// records).
	IssuerMemory []memory `json:"issuer_memory_at_end"`
	Rounds       []round  `json:"rounds"`
	Machine      struct {
		CPUs int    `json:"cpus"`
		Go   string `json:"go"`
		Date string `json:"date"`
		// LoadAvg is the 1-minute load average at the start and at the
		// end: the machine is shared, and every figure moves with it.
		LoadAvg [2]float64 `json:"load_average_start_end"`
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

func run(out string, burst, nodes, seq, rounds int, qps string, gap time.Duration, durable bool) error {
	ctx := context.Background()
	var r results
	r.Burst, r.Nodes, r.Replicas, r.MaxConns, r.KubeAPIQPS = burst, nodes, replicas, maxConns, qps
	r.PostgresFsync = durable
	r.C1GapMS = float64(gap.Microseconds()) / 1000
	r.Machine.CPUs, r.Machine.Go, r.Machine.Date = runtime.NumCPU(), runtime.Version(), time.Now().UTC().Format(time.RFC3339)
	r.Machine.LoadAvg[0] = loadAverage()

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
	pg, err := pgtest.StartWith(pgtest.Options{Durable: durable})
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
			// The volume ID kubelet gives it, as a node plugin sends it: the
			// pod check matches it, the issuer reads its tombstone.
			p, volume, err := objs.TenantPod(ctx, "shop", fmt.Sprintf("orders-%d", i), "orders", fmt.Sprintf("node-%d", node), "orders-db")
			pods[i] = pod{p, volume, node}
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
	inv, err := inventory.NewClient(acfg)
	if err != nil {
		return err
	}
	b := &bench{ctx: ctx, sampler: sampler, api: admin, inv: inv, pods: pods, plugins: plugins, inProcess: inProcess, gap: gap}
	for round := range rounds {
		fmt.Printf("round %d of %d\n", round+1, rounds)
		rr, err := b.round(fmt.Sprintf("r%d", round), burst, seq)
		if err != nil {
			return err
		}
		r.Rounds = append(r.Rounds, rr)
		if n, err := pg.CountRoles(ctx, "esc_"); err != nil || n != 0 {
			return fmt.Errorf("%d roles left after round %d (%v)", n, round+1, err)
		}
	}
	r.Median = median(r.Rounds)
	r.Machine.LoadAvg[1] = loadAverage()
	for _, is := range issuers {
		m, err := memoryOf(is.Pid())
		if err != nil {
			return err
		}
		r.IssuerMemory = append(r.IssuerMemory, m)
	}

	fmt.Printf("\nmedians of %d rounds (each row's figure from each round, then their median):\n", rounds)
	fmt.Printf("%-18s %-6s %9s %9s %8s %9s %7s %s\n", "", "", "p50 ms", "p99 ms", "wall s", "per s", "fails", "max admin conns")
	for _, row := range []struct{ verb, name string }{
		{"mint", "in-process c1"}, {"mint", "issuer c1"}, {"mint", "issuer burst"}, {"drop", "issuer burst"},
		{"mint", "in-process burst"}, {"drop", "in-process burst"},
	} {
		l := r.Median.Mint[row.name]
		if row.verb == "drop" {
			l = r.Median.Drop[row.name]
		}
		rate := ""
		if strings.HasSuffix(row.name, "burst") && l.WallS > 0 {
			rate = fmt.Sprintf("%.0f", float64(burst)/l.WallS)
		}
		fmt.Printf("%-18s %-6s %9.2f %9.2f %8.2f %9s %7d %d\n", row.name, row.verb, l.P50, l.P99, l.WallS, rate, l.Failures, l.AdminConns)
	}
	m := r.Median
	fmt.Printf("issuer c1 / in-process c1 p50: %.2fx (each round: %s)\n", m.C1Ratio, roundsOf(r.Rounds, func(x round) float64 { return x.C1Ratio }))
	fmt.Printf("(load average: %.2f at the start, %.2f at the end, on %d CPUs)\n", r.Machine.LoadAvg[0], r.Machine.LoadAvg[1], r.Machine.CPUs)
	fmt.Printf("(PostgreSQL fsync: %v; the API server's etcd syncs its writes on disk)\n", durable)
	if gap > 0 {
		fmt.Printf("(c1 rows: a pause of %v after each mint, both paths)\n", gap)
	}
	fmt.Printf("issuer c1, API requests per mint: %.2f TokenReviews, %.2f pod reads, %.2f Credential writes (status included)\n",
		m.C1API.Reviews, m.C1API.PodReads, m.C1API.CredWrites)
	fmt.Printf("issuer burst wall: %.2f s, in-process burst wall: %.2f s (each round: %s)\n", m.Mint["issuer burst"].WallS,
		m.Mint["in-process burst"].WallS, roundsOf(r.Rounds, func(x round) float64 { return x.Mint["issuer burst"].WallS }))
	fmt.Printf("issuer burst: all %d Credentials there when the last mint answered in every round: %v; their status all Issued %.2f s after it\n",
		burst, allRecorded(r.Rounds), m.StatusLagS)
	fmt.Printf("issuer burst, API requests per mint until the last answer: %.2f Credential writes, %.2f Credential reads, %.2f pod reads; %.2f Credential writes once every status is written\n",
		m.API.CredWritesPath, m.API.CredReadsPath, m.API.PodReadsPath, m.API.CredWritesAll)
	for i, m := range r.IssuerMemory {
		fmt.Printf("issuer replica %d at the end (%d pods in the cluster): %.1f MiB resident, %.1f MiB anonymous\n", i+1, len(pods)+nodes, m.RSS, m.Anon)
	}
	fmt.Printf("(admin connections: the issuer's %d replicas x maxConns %d = %d at most; in-process, one pool of %d)\n",
		replicas, maxConns, replicas*maxConns, maxConns)
	for _, rr := range r.Rounds {
		if !rr.Recorded {
			return fmt.Errorf("the issuer burst row is void: not every Credential was there when the last mint answered (%d of %d)", rr.Records, burst)
		}
	}
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(out, append(data, '\n'), 0o644)
}

// bench is what a round measures with.
type bench struct {
	ctx       context.Context
	sampler   *pgx.Conn
	api       kubernetes.Interface
	inv       *inventory.Client
	pods      []pod
	plugins   []*postgres.Provider
	inProcess *postgres.Provider
	// gap is the pause after each mint of the c1 rows.
	gap time.Duration
}

type pod struct {
	p      provider.Pod
	volume string
	node   int
}

type job struct {
	lease string
	pod   pod
}

// watch samples the admin connections of app until the function it
// returns is called, which returns the most seen at once.
func (b *bench) watch(app string) func() int {
	var peak atomic.Int64
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			var n int64
			if err := b.sampler.QueryRow(b.ctx, `SELECT count(*) FROM pg_stat_activity
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

// round measures every row once: mints one at a time on both paths in
// alternating blocks, then a burst through the issuer (its Credentials
// checked, the API requests it cost counted), its drops, and a burst in
// process with its drops. Leases are named after the round (tag).
func (b *bench) round(tag string, burst, seq int) (round, error) {
	ctx := b.ctx
	rr := round{Mint: map[string]latency{}, Drop: map[string]latency{}}
	var live []provider.Lease
	// liveVia is the path each live lease was minted through, which drops
	// it (a lease minted through the issuer and dropped in process would
	// leave its record for the inventory to clean up during a later row).
	var liveVia []*postgres.Provider
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
		stop := b.watch(appOf(name))
		gap := time.Duration(0)
		if concurrency == 1 {
			gap = b.gap
		}
		ds, fails, wall := timeAll(len(jobs), concurrency, gap, func(i int) error {
			j := jobs[i]
			l, err := via(j.pod).Issue(ctx, provider.Request{LeaseID: j.lease, VolumeID: j.pod.volume, Class: "shop/orders-db", Params: params, Pod: j.pod.p})
			if err == nil {
				l.ID, l.Params = j.lease, params
				liveMu.Lock()
				live = append(live, l)
				liveVia = append(liveVia, via(j.pod))
				liveMu.Unlock()
			}
			return err
		})
		prev := rr.Mint[name]
		raw[name] = append(raw[name], ds...)
		rawFails[name] += fails
		l := summarize(raw[name], rawFails[name])
		l.WallS, l.AdminConns = prev.WallS+wall.Seconds(), max(prev.AdminConns, stop())
		rr.Mint[name] = l
		if fails > 0 {
			return fmt.Errorf("%s: %d mints failed", name, fails)
		}
		return nil
	}
	dropAll := func(name string, concurrency int) error {
		via := func(i int) *postgres.Provider { return liveVia[i] }
		stop := b.watch(appOf(name))
		ds, fails, wall := timeAll(len(live), concurrency, 0, func(i int) error { return via(i).Revoke(ctx, live[i]) })
		l := summarize(ds, fails)
		l.WallS, l.AdminConns = wall.Seconds(), stop()
		rr.Drop[name] = l
		live, liveVia = nil, nil
		if fails > 0 {
			return fmt.Errorf("%s: %d drops failed", name, fails)
		}
		return nil
	}
	jobs := func(prefix string, from, n int) []job {
		js := make([]job, n)
		for i := range js {
			js[i] = job{fmt.Sprintf("%s-%s-%d", prefix, tag, i), b.pods[from+i]}
		}
		return js
	}
	viaIssuer := func(p pod) *postgres.Provider { return b.plugins[p.node] }
	viaLocal := func(pod) *postgres.Provider { return b.inProcess }

	fmt.Println("  warm-up ...")
	if err := mintAll("warm-up", jobs("warm", burst, min(seq, 20)), 4, viaIssuer); err != nil {
		return rr, err
	}
	if err := dropAll("warm-up", 4); err != nil {
		return rr, err
	}
	delete(rr.Mint, "warm-up")
	delete(rr.Drop, "warm-up")
	// One at a time, alternating paths in blocks, so both see the same machine.
	fmt.Printf("  %d mints one at a time, in-process and through the issuer ...\n", seq)
	// The API server's counters are read once before the row and once
	// after it: a read of its /metrics costs it tens of milliseconds of
	// CPU and a garbage collection, which, read around every block,
	// landed in the next block's mints.
	c1Before, err := b.requests()
	if err != nil {
		return rr, err
	}
	for blk := 0; blk < seq; blk += 10 {
		n := min(10, seq-blk)
		for _, p := range []struct {
			name string
			via  func(pod) *postgres.Provider
		}{{"in-process c1", viaLocal}, {"issuer c1", viaIssuer}} {
			block := jobs(fmt.Sprintf("%s-%d", p.name[:5], blk), burst+blk, n)
			if err := mintAll(p.name, block, 1, p.via); err != nil {
				return rr, err
			}
			if p.name == "issuer c1" {
				// The block's status writes (after its answers) go before
				// the next block, so that neither path's block runs beside
				// the other's work.
				if err := b.awaitIssued(block); err != nil {
					return rr, err
				}
			}
		}
	}
	c1After, err := b.requests()
	if err != nil {
		return rr, err
	}
	rr.C1API = c1Cost{Reviews: float64(c1After.reviews-c1Before.reviews) / float64(seq),
		PodReads:   float64(c1After.podReads-c1Before.podReads) / float64(seq),
		CredWrites: float64(c1After.credWrites-c1Before.credWrites) / float64(seq)}
	if err := dropAll("c1 cleanup", 4); err != nil {
		return rr, err
	}
	delete(rr.Drop, "c1 cleanup")
	if l := rr.Mint["in-process c1"]; l.P50 > 0 {
		rr.C1Ratio = rr.Mint["issuer c1"].P50 / l.P50
	}

	fmt.Printf("  burst: %d mints at once from %d nodes through the issuer ...\n", burst, len(b.plugins))
	before, err := b.requests()
	if err != nil {
		return rr, err
	}
	if err := mintAll("issuer burst", jobs("burst", 0, burst), burst, viaIssuer); err != nil {
		return rr, err
	}
	answered := time.Now()
	atAnswer, err := b.requests()
	if err != nil {
		return rr, err
	}
	// The inventory, as the last mint answered: every record must be
	// there (else the row is void); then how long until every status
	// says Issued (written off the mints' path).
	prefix := "burst-" + tag + "-"
	records, issued, err := b.records(prefix)
	if err != nil {
		return rr, err
	}
	rr.Records, rr.Recorded = records, records == burst
	for issued < burst && time.Since(answered) < time.Minute {
		time.Sleep(50 * time.Millisecond)
		if _, issued, err = b.records(prefix); err != nil {
			return rr, err
		}
	}
	rr.StatusLagS = time.Since(answered).Seconds()
	if issued < burst {
		return rr, fmt.Errorf("%d of %d Credentials of the burst say Issued a minute after the last answer", issued, burst)
	}
	settled, err := b.requests()
	if err != nil {
		return rr, err
	}
	n := float64(burst)
	rr.API = apiCost{
		CredWritesPath: float64(atAnswer.credWrites-before.credWrites) / n,
		CredReadsPath:  float64(atAnswer.credReads-before.credReads) / n,
		PodReadsPath:   float64(atAnswer.podReads-before.podReads) / n,
		CredWritesAll:  float64(settled.credWrites-before.credWrites) / n,
	}
	fmt.Printf("  burst: %d drops at once through the issuer ...\n", burst)
	if err := dropAll("issuer burst", burst); err != nil {
		return rr, err
	}
	fmt.Printf("  burst: %d mints at once in-process ...\n", burst)
	if err := mintAll("in-process burst", jobs("local-burst", 0, burst), burst, viaLocal); err != nil {
		return rr, err
	}
	if err := dropAll("in-process burst", burst); err != nil {
		return rr, err
	}
	return rr, nil
}

// awaitIssued waits, for 5 s at most, until the Credential of each of
// jobs says Issued: its status written. It reads them one by one, which
// costs the API server little.
func (b *bench) awaitIssued(jobs []job) error {
	deadline := time.Now().Add(5 * time.Second)
	for _, j := range jobs {
		for {
			c, err := b.inv.Get(b.ctx, j.pod.p.Namespace, inventory.Name(j.lease))
			if err != nil {
				return fmt.Errorf("the Credential of %s: %w", j.lease, err)
			}
			if c.Status.State == v1alpha1.StateIssued || time.Now().After(deadline) {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	return nil
}

// records counts the Credentials in the tenant's namespace whose lease
// begins with prefix, and those of them whose status says Issued.
func (b *bench) records(prefix string) (all, issued int, err error) {
	l, err := b.inv.List(b.ctx, "shop", metav1.ListOptions{})
	if err != nil {
		return 0, 0, err
	}
	for _, c := range l.Items {
		if !strings.HasPrefix(c.Spec.LeaseID, prefix) || c.DeletionTimestamp != nil {
			continue
		}
		all++
		if c.Status.State == v1alpha1.StateIssued {
			issued++
		}
	}
	return all, issued, nil
}

// requestCounts are counters of the API server's requests so far.
type requestCounts struct{ credWrites, credReads, podReads, reviews int64 }

// requests reads the API server's apiserver_request_total: the writes
// and reads of Credentials, and the reads of pods (one GET, by any
// client: the issuers' pod checks here).
func (b *bench) requests() (requestCounts, error) {
	var c requestCounts
	data, err := b.api.CoreV1().RESTClient().Get().AbsPath("/metrics").DoRaw(b.ctx)
	if err != nil {
		return c, fmt.Errorf("the API server's metrics: %w", err)
	}
	for line := range strings.SplitSeq(string(data), "\n") {
		rest, ok := strings.CutPrefix(line, "apiserver_request_total{")
		if !ok {
			continue
		}
		labels, value, ok := strings.Cut(rest, "} ")
		if !ok {
			continue
		}
		v, err := strconv.ParseFloat(strings.TrimSpace(value), 64)
		if err != nil {
			continue
		}
		has := func(k, val string) bool { return strings.Contains(labels, k+`="`+val+`"`) }
		switch {
		case has("resource", "credentials") && (has("verb", "POST") || has("verb", "PUT") || has("verb", "PATCH") || has("verb", "DELETE")):
			c.credWrites += int64(v)
		case has("resource", "credentials") && has("verb", "GET"):
			c.credReads += int64(v)
		case has("resource", "pods") && has("verb", "GET") && has("subresource", ""):
			c.podReads += int64(v)
		case has("resource", "tokenreviews") && has("verb", "POST"):
			c.reviews += int64(v)
		}
	}
	return c, nil
}

// memory is a process's resident memory, MiB.
type memory struct {
	RSS  float64 `json:"rss_mib"`
	Anon float64 `json:"anon_mib"`
}

// memoryOf reads the resident memory of process pid.
func memoryOf(pid int) (memory, error) {
	total, anon, err := resident.MiB(pid)
	return memory{RSS: total, Anon: anon}, err
}

// loadAverage is the 1-minute load average (0 if unknown).
func loadAverage() float64 {
	data, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return 0
	}
	f := strings.Fields(string(data))
	if len(f) == 0 {
		return 0
	}
	v, _ := strconv.ParseFloat(f[0], 64)
	return v
}

// roundsOf lists f of each round.
func roundsOf(rs []round, f func(round) float64) string {
	var out []string
	for _, r := range rs {
		out = append(out, fmt.Sprintf("%.2f", f(r)))
	}
	return strings.Join(out, ", ")
}

func allRecorded(rs []round) bool {
	for _, r := range rs {
		if !r.Recorded {
			return false
		}
	}
	return true
}

// median is each figure's median over the rounds.
func median(rs []round) round {
	med := func(f func(round) float64) float64 {
		v := make([]float64, len(rs))
		for i, r := range rs {
			v[i] = f(r)
		}
		sort.Float64s(v)
		if len(v) == 0 {
			return 0
		}
		if len(v)%2 == 1 {
			return v[len(v)/2]
		}
		return (v[len(v)/2-1] + v[len(v)/2]) / 2
	}
	medLatency := func(get func(round) latency) latency {
		return latency{
			P50:        med(func(r round) float64 { return get(r).P50 }),
			P99:        med(func(r round) float64 { return get(r).P99 }),
			WallS:      med(func(r round) float64 { return get(r).WallS }),
			Samples:    int(med(func(r round) float64 { return float64(get(r).Samples) })),
			Failures:   int(med(func(r round) float64 { return float64(get(r).Failures) })),
			AdminConns: int(med(func(r round) float64 { return float64(get(r).AdminConns) })),
		}
	}
	m := round{Mint: map[string]latency{}, Drop: map[string]latency{}, Recorded: allRecorded(rs)}
	if len(rs) == 0 {
		return m
	}
	for name := range rs[0].Mint {
		m.Mint[name] = medLatency(func(r round) latency { return r.Mint[name] })
	}
	for name := range rs[0].Drop {
		m.Drop[name] = medLatency(func(r round) latency { return r.Drop[name] })
	}
	m.C1Ratio = med(func(r round) float64 { return r.C1Ratio })
	m.C1API = c1Cost{
		Reviews:    med(func(r round) float64 { return r.C1API.Reviews }),
		PodReads:   med(func(r round) float64 { return r.C1API.PodReads }),
		CredWrites: med(func(r round) float64 { return r.C1API.CredWrites }),
	}
	m.StatusLagS = med(func(r round) float64 { return r.StatusLagS })
	m.Records = int(med(func(r round) float64 { return float64(r.Records) }))
	m.API = apiCost{
		CredWritesPath: med(func(r round) float64 { return r.API.CredWritesPath }),
		CredReadsPath:  med(func(r round) float64 { return r.API.CredReadsPath }),
		PodReadsPath:   med(func(r round) float64 { return r.API.PodReadsPath }),
		CredWritesAll:  med(func(r round) float64 { return r.API.CredWritesAll }),
	}
	return m
}

// timeAll runs f for 0..n-1, concurrency at once, and times each; gap is
// a pause after each (not timed, in the wall time).
func timeAll(n, concurrency int, gap time.Duration, f func(i int) error) ([]time.Duration, int, time.Duration) {
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
			defer time.Sleep(gap)
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
