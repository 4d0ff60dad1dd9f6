// Command bench measures the driver as kubelet sees it: the real binary
// (with a benchmark-only "static" provider) over its real CSI socket,
// side by side with the floor, the bare system calls a publish and
// unpublish cannot avoid, timed in this same process and run. It prints a
// table and writes bench-results.json. Run it as root through "make bench".
//
// The node plugin's own binary (--driver) gives the static and memory
// rows; the node plugin with the aws section (--driver-aws, optional:
// test/bench/driver/aws) a memory row beside it; the all-in-one
// (--driver-all: the issuer in process) the
// postgres, give-back and backlog rows, and the cluster issuer's memory
// (on test/kube's API server); the previous binary (--before, built from
// an earlier commit in the same run) the memory rows' baseline. Every
// binary's size is reported. --only memory runs the memory rows alone,
// the node plugin's, --driver-aws's and --before's in turn, several
// rounds (make bench-memory).
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"sync"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/jackc/pgx/v5"
	"golang.org/x/sys/unix"

	"github.com/ephemeral-secrets/csi-driver/test/bench/resident"
	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/kubelet"
	"github.com/ephemeral-secrets/csi-driver/test/pgtest"
)

func main() {
	bin := flag.String("driver", "bin/bench-driver", "benchmark build of the node plugin (test/bench/driver)")
	binAWS := flag.String("driver-aws", "", "benchmark build of the node plugin with the aws section (test/bench/driver/aws): a memory row (empty: none)")
	binAll := flag.String("driver-all", "bin/bench-driver-all", "benchmark build of the all-in-one (test/bench/driver/all): the postgres rows, the issuer's memory")
	before := flag.String("before", "", "the node plugin's benchmark build of an earlier commit: the memory rows' baseline (empty: none)")
	out := flag.String("out", "bench-results.json", "where the JSON results go")
	n1 := flag.Int("n", 500, "volumes for the concurrency-1 rows")
	n16 := flag.Int("n16", 1000, "volumes for the concurrency-16 rows and the memory row")
	npg := flag.Int("npg", 100, "volumes for the postgres rows")
	ngb := flag.Int("ngb", 200, "volumes for the give-back rows (half wait for the backend, half not)")
	nbl := flag.Int("nbacklog", 2000, "volumes for the revocation backlog row (0: skip it)")
	only := flag.String("only", "", `"backlog": only the revocation backlog row; "memory": only the memory rows, of --driver and --before alternately, --rounds times (medians)`)
	rounds := flag.Int("rounds", 5, "rounds of the memory rows with --only memory")
	var driverArgs []string
	flag.Func("driver-arg", "a flag for the driver, as --name=value (repeatable)", func(v string) error {
		driverArgs = append(driverArgs, v)
		return nil
	})
	flag.Parse()
	if *only == "memory" {
		// The all-in-one, with the aws section (what the chart ran with
		// providers.aws.enabled before ephemeral-secrets-csi-aws), only
		// when named.
		mb := binaries{node: *bin, aws: *binAWS, before: *before}
		flag.Visit(func(f *flag.Flag) {
			if f.Name == "driver-all" {
				mb.all = *binAll
			}
		})
		if err := runMemory(mb, *out, *n16, *rounds, driverArgs); err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
			os.Exit(1)
		}
		return
	}
	if err := run(binaries{node: *bin, aws: *binAWS, all: *binAll, before: *before}, *out, *n1, *n16, *npg, *ngb, *nbl, *only == "backlog", driverArgs); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

// binaries are the benchmark's builds: the node plugin's, the node
// plugin's with the aws section (optional), the all-in-one's, and an
// earlier commit's node plugin (optional).
type binaries struct{ node, aws, all, before string }

// memory is a process's resident memory, all of it and the anonymous
// part (heap, stacks): the rest is the binary's own clean, file-backed
// pages.
type memory struct {
	Idle        float64 `json:"idle"`
	Volumes     float64 `json:"volumes_1000,omitempty"`
	IdleAnon    float64 `json:"idle_anon"`
	VolumesAnon float64 `json:"volumes_1000_anon,omitempty"`
}

type latency struct {
	P50      float64 `json:"p50_ms"`
	P99      float64 `json:"p99_ms"`
	OpsPerS  float64 `json:"ops_per_s,omitempty"`
	Samples  int     `json:"samples"`
	Failures int     `json:"failures,omitempty"`
}

type results struct {
	Floor struct {
		CycleP50 float64 `json:"mount_cycle_p50_ms"`
		CycleP99 float64 `json:"mount_cycle_p99_ms"`
	} `json:"floor"`
	// RPC is the round trip of a call that does nothing, measured
	// alternately with the republishes.
	RPC       latency            `json:"rpc_noop_c1"`
	Publish   map[string]latency `json:"publish"`
	Republish map[string]latency `json:"republish"`
	Unpublish map[string]latency `json:"unpublish"`
	// RSS is the node plugin's own binary, serving the static provider.
	RSS memory `json:"rss_mib"`
	// RSSBefore is the earlier commit's node plugin, measured alike.
	RSSBefore *memory `json:"rss_before_mib,omitempty"`
	// RSSAWS is the node plugin with the aws section (an aws section in
	// its backend file), measured alike.
	RSSAWS *memory `json:"rss_aws_node_mib,omitempty"`
	// RSSAll is the all-in-one serving as a node plugin with the issuer in
	// process, idle; RSSIssuer the cluster issuer (the all-in-one's
	// "issuer", leading, no request), idle.
	RSSAll    memory `json:"rss_all_in_one_node_mib"`
	RSSIssuer memory `json:"rss_issuer_mib"`
	// BinaryMB are the stripped binaries' sizes (MB, 10^6 bytes).
	BinaryMB struct {
		Node   float64 `json:"node"`
		AWS    float64 `json:"aws_node,omitempty"`
		All    float64 `json:"all_in_one"`
		Before float64 `json:"before,omitempty"`
	} `json:"binary_mb"`
	Postgres struct {
		PublishP50 float64 `json:"publish_p50_ms"`
		PublishP99 float64 `json:"publish_p99_ms"`
		RevokeP50  float64 `json:"revoke_after_unpublish_p50_ms"`
		RevokeP99  float64 `json:"revoke_after_unpublish_p99_ms"`
	} `json:"postgres"`
	GiveBack giveBack `json:"lease_socket_give_back"`
	Backlog  backlog  `json:"revocation_backlog"`
	Targets  []target `json:"targets"`
	Machine  struct {
		CPUs int    `json:"cpus"`
		Go   string `json:"go"`
		Date string `json:"date"`
	} `json:"machine"`
}

type target struct {
	What  string  `json:"what"`
	Value float64 `json:"value"`
	Limit float64 `json:"limit"`
	Unit  string  `json:"unit"`
	Met   bool    `json:"met"`
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func summarize(ds []time.Duration, elapsed time.Duration, failures int) latency {
	if len(ds) == 0 {
		return latency{Failures: failures}
	}
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	pct := func(p float64) float64 { return ms(s[min(len(s)-1, int(p*float64(len(s))))]) }
	l := latency{P50: pct(0.50), P99: pct(0.99), Samples: len(s), Failures: failures}
	if elapsed > 0 {
		l.OpsPerS = float64(len(s)) / elapsed.Seconds()
	}
	return l
}

func run(bins binaries, out string, n1, n16, npg, ngb, nbl int, onlyBacklog bool, driverArgs []string) error {
	if os.Geteuid() != 0 {
		return errors.New("run as root: the driver mounts tmpfs")
	}
	var r results
	r.Publish, r.Republish, r.Unpublish = map[string]latency{}, map[string]latency{}, map[string]latency{}
	r.Machine.CPUs, r.Machine.Go, r.Machine.Date = runtime.NumCPU(), runtime.Version(), time.Now().UTC().Format(time.RFC3339)
	ctx := context.Background()
	var err error
	if r.BinaryMB.Node, err = sizeMB(bins.node); err != nil {
		return err
	}
	if r.BinaryMB.All, err = sizeMB(bins.all); err != nil {
		return err
	}
	if bins.before != "" {
		if r.BinaryMB.Before, err = sizeMB(bins.before); err != nil {
			return err
		}
	}
	if bins.aws != "" {
		if r.BinaryMB.AWS, err = sizeMB(bins.aws); err != nil {
			return err
		}
	}

	env, err := newEnv()
	if err != nil {
		return err
	}
	defer env.Close()

	if !onlyBacklog {
		fmt.Println("floor: bare system calls of a publish + unpublish ...")
		floor, err := measureFloor(filepath.Join(env.KubeletDir, "floor"), 300)
		if err != nil {
			return fmt.Errorf("floor: %w", err)
		}
		r.Floor.CycleP50, r.Floor.CycleP99 = floor.P50, floor.P99
	}

	pg, err := pgtest.Start()
	if err != nil {
		return err
	}
	defer pg.Close()
	classes := filepath.Join(env.Base, "classes.yaml")
	backends := filepath.Join(env.Base, "backends.yaml")
	if err := os.WriteFile(classes, []byte(classesYAML), 0o600); err != nil {
		return err
	}
	if err := os.WriteFile(backends, []byte(fmt.Sprintf(backendsYAML, pg.AdminURL())), 0o600); err != nil {
		return err
	}
	awsBackends, err := writeAWSBackends(env.Base)
	if err != nil {
		return err
	}
	// start runs bin as the node plugin on the environment, with the
	// backend file backends (none: "").
	start := func(bin, name, backends string) (*harness.Driver, *kubelet.Kubelet, error) {
		args := []string{"--classes-file", classes, "--audit-log", filepath.Join(env.Base, "audit.log"), "-v", "0"}
		if backends != "" {
			args = append(args, "--backend-config", backends)
		}
		drv := &harness.Driver{Bin: bin, Env: env, LogFile: filepath.Join(env.Base, name+".log"), Args: append(args, driverArgs...)}
		if err := drv.Start(ctx); err != nil {
			return nil, nil, err
		}
		kube, err := kubelet.Dial(env.Endpoint(), env.KubeletDir)
		if err != nil {
			drv.Stop()
			return nil, nil, err
		}
		time.Sleep(time.Second)
		return drv, kube, nil
	}

	if !onlyBacklog {
		drv, kube, err := start(bins.node, "driver", "")
		if err != nil {
			return err
		}
		err = measureStatic(ctx, kube, drv, n1, n16, &r)
		kube.Close()
		drv.Stop()
		if err != nil {
			return err
		}
		// memoryOf measures bin's memory as the node plugin's, with the
		// backend file backends.
		memoryOf := func(what, bin, name, backends string) (*memory, error) {
			fmt.Printf("%s (%s): memory idle and with %d volumes ...\n", what, filepath.Base(bin), n16)
			drv, kube, err := start(bin, name, backends)
			if err != nil {
				return nil, err
			}
			defer drv.Stop()
			defer kube.Close()
			m := &memory{}
			if err := measureMemory(ctx, kube, drv, n16, m); err != nil {
				return nil, fmt.Errorf("%s: %w", what, err)
			}
			return m, nil
		}
		if bins.before != "" {
			if r.RSSBefore, err = memoryOf("before", bins.before, "before", ""); err != nil {
				return err
			}
		}
		if bins.aws != "" {
			if r.RSSAWS, err = memoryOf("aws node plugin", bins.aws, "driver-aws", awsBackends); err != nil {
				return err
			}
		}
	}

	drv, kube, err := start(bins.all, "driver-all", backends)
	if err != nil {
		return err
	}
	defer drv.Stop()
	defer kube.Close()
	if r.RSSAll.Idle, r.RSSAll.IdleAnon, err = rssMiB(drv.Pid()); err != nil {
		return err
	}
	if !onlyBacklog {
		if err := measurePostgresRows(ctx, kube, pg, npg, ngb, &r); err != nil {
			return err
		}
	}
	if nbl > 0 {
		fmt.Printf("revocation backlog: %d volumes unpublished with the backend up, %d with it down, then the backend back ...\n", nbl, nbl)
		if err := measureBacklog(ctx, kube, pg, drv, filepath.Join(env.Base, "audit.log"), nbl, &r); err != nil {
			return fmt.Errorf("backlog: %w", err)
		}
	}
	if !onlyBacklog {
		fmt.Println("issuer: memory of a leading replica, idle ...")
		if r.RSSIssuer, err = issuerMemory(ctx, bins.all, pg); err != nil {
			return fmt.Errorf("issuer: %w", err)
		}
	}

	if onlyBacklog {
		r.Targets = backlogTargets(r.Backlog)
		printBacklog(r.Backlog)
		printTargets(r.Targets)
	} else {
		r.Targets = targets(&r)
		printTable(&r, bins.node)
	}
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(out, append(data, '\n'), 0o644); err != nil {
		return err
	}
	fmt.Println("\nwrote", out)
	return nil
}

// newEnv is the driver's environment (test/harness), its kubelet
// directory a tmpfs of its own. With it on this machine's ext4, a profile
// of the driver during this benchmark showed the target's mkdir at a
// median 0.2-0.3 ms inside ext4's inode allocator (recently_deleted, after
// the run's own deletions): the host disk's cost, not the driver's, and it
// would swamp the rest.
func newEnv() (*harness.Env, error) {
	env, err := harness.NewEnv()
	if err != nil {
		return nil, err
	}
	if err := unix.Mount("tmpfs", env.KubeletDir, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "mode=0750"); err != nil {
		env.Close()
		return nil, err
	}
	return env, nil
}

func sizeMB(path string) (float64, error) {
	st, err := os.Stat(path)
	if err != nil {
		return 0, err
	}
	return float64(st.Size()) / 1e6, nil
}

// measureMemory reads the driver's memory idle, then with n static
// volumes published (at concurrency 16), which it unpublishes.
func measureMemory(ctx context.Context, kube *kubelet.Kubelet, drv *harness.Driver, n int, m *memory) error {
	var err error
	if m.Idle, m.IdleAnon, err = rssMiB(drv.Pid()); err != nil {
		return err
	}
	reqs, err := requests(kube, "mem", "static", n)
	if err != nil {
		return err
	}
	if _, _, fails := timeAll(reqs, 16, func(req *csi.NodePublishVolumeRequest) error {
		_, err := kube.Node.NodePublishVolume(ctx, req)
		return err
	}); fails > 0 {
		return fmt.Errorf("%d of %d publishes failed", fails, n)
	}
	time.Sleep(500 * time.Millisecond)
	if m.Volumes, m.VolumesAnon, err = rssMiB(drv.Pid()); err != nil {
		return err
	}
	if _, _, fails := timeAll(reqs, 16, unpublisher(ctx, kube)); fails > 0 {
		return fmt.Errorf("%d of %d unpublishes failed", fails, n)
	}
	return nil
}

// measureStatic measures the static provider's rows and the node
// plugin's memory.
func measureStatic(ctx context.Context, kube *kubelet.Kubelet, drv *harness.Driver, n1, n16 int, r *results) error {
	var err error
	if r.RSS.Idle, r.RSS.IdleAnon, err = rssMiB(drv.Pid()); err != nil {
		return err
	}

	fmt.Println("driver: warm-up ...")
	if _, _, err := cycle(ctx, kube, "warm", "static", 50, 4); err != nil {
		return err
	}

	fmt.Printf("driver: %d publishes, republishes, unpublishes at concurrency 1 ...\n", n1)
	reqs, err := requests(kube, "c1", "static", n1)
	if err != nil {
		return err
	}
	pub, el, fails := timeAll(reqs, 1, func(req *csi.NodePublishVolumeRequest) error {
		_, err := kube.Node.NodePublishVolume(ctx, req)
		return err
	})
	r.Publish["c1"] = summarize(pub, el, fails)
	// Republishes alternate with calls that do nothing (NodeGetCapabilities:
	// gRPC over the socket and our interceptor), so that both see the same
	// machine and their difference is the driver's own work.
	var repub, noop []time.Duration
	fails = 0
	for _, req := range reqs {
		t := time.Now()
		if _, err := kube.Node.NodeGetCapabilities(ctx, &csi.NodeGetCapabilitiesRequest{}); err != nil {
			return err
		}
		noop = append(noop, time.Since(t))
		t = time.Now()
		if _, err := kube.Node.NodePublishVolume(ctx, req); err != nil {
			fails++
			continue
		}
		repub = append(repub, time.Since(t))
	}
	r.Republish["c1"] = summarize(repub, 0, fails)
	r.RPC = summarize(noop, 0, 0)
	unpub, el, fails := timeAll(reqs, 1, unpublisher(ctx, kube))
	r.Unpublish["c1"] = summarize(unpub, el, fails)

	fmt.Printf("driver: %d publishes and unpublishes at concurrency 16, memory with them live ...\n", n16)
	reqs, err = requests(kube, "c16", "static", n16)
	if err != nil {
		return err
	}
	pub, el, fails = timeAll(reqs, 16, func(req *csi.NodePublishVolumeRequest) error {
		_, err := kube.Node.NodePublishVolume(ctx, req)
		return err
	})
	r.Publish["c16"] = summarize(pub, el, fails)
	time.Sleep(500 * time.Millisecond)
	if r.RSS.Volumes, r.RSS.VolumesAnon, err = rssMiB(drv.Pid()); err != nil {
		return err
	}
	unpub, el, fails = timeAll(reqs, 16, unpublisher(ctx, kube))
	r.Unpublish["c16"] = summarize(unpub, el, fails)
	return nil
}

// measurePostgresRows measures the postgres and give-back rows (the
// issuer in process).
func measurePostgresRows(ctx context.Context, kube *kubelet.Kubelet, pg *pgtest.Server, npg, ngb int, r *results) error {
	fmt.Printf("postgres: %d publishes, and the time from unpublish to the role refusing logins ...\n", npg)
	if err := measurePostgres(ctx, kube, pg, npg, r); err != nil {
		return err
	}

	fmt.Printf("lease socket: %d credentials and %d task leases given back, and the time from the answer to the login refused ...\n", ngb, ngb)
	if err := measureGiveBack(ctx, kube, pg, ngb, r); err != nil {
		return fmt.Errorf("give-back: %w", err)
	}

	return nil
}

// requests builds n publish requests of distinct pods, with the target
// parents kubelet would have made, outside any timing.
func requests(k *kubelet.Kubelet, prefix, class string, n int) ([]*csi.NodePublishVolumeRequest, error) {
	reqs := make([]*csi.NodePublishVolumeRequest, n)
	for i := range reqs {
		pod := kubelet.NewPod("bench", fmt.Sprintf("%s-%d", prefix, i), "bench")
		pod.Tokens = map[string]string{"vault": "bench-token"}
		req, err := k.PublishRequest(pod, kubelet.Volume{Name: "secrets", ReadOnly: true, MountGroup: "2000",
			Attributes: map[string]string{"secretProviderClass": class}})
		if err != nil {
			return nil, err
		}
		reqs[i] = req
	}
	return reqs, nil
}

func unpublisher(ctx context.Context, k *kubelet.Kubelet) func(*csi.NodePublishVolumeRequest) error {
	return func(req *csi.NodePublishVolumeRequest) error {
		_, err := k.Node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: req.VolumeId, TargetPath: req.TargetPath})
		return err
	}
}

// timeAll runs op on every request with the given concurrency and returns
// each call's latency, the wall time and the failures.
func timeAll(reqs []*csi.NodePublishVolumeRequest, conc int, op func(*csi.NodePublishVolumeRequest) error) ([]time.Duration, time.Duration, int) {
	lat := make([]time.Duration, len(reqs))
	errs := make([]error, len(reqs))
	next := make(chan int)
	var wg sync.WaitGroup
	start := time.Now()
	for range conc {
		wg.Go(func() {
			for i := range next {
				t := time.Now()
				errs[i] = op(reqs[i])
				lat[i] = time.Since(t)
			}
		})
	}
	for i := range reqs {
		next <- i
	}
	close(next)
	wg.Wait()
	elapsed := time.Since(start)
	var ok []time.Duration
	fails := 0
	for i, err := range errs {
		if err != nil {
			if fails == 0 {
				fmt.Fprintln(os.Stderr, "  first failure:", err)
			}
			fails++
			continue
		}
		ok = append(ok, lat[i])
	}
	return ok, elapsed, fails
}

func cycle(ctx context.Context, k *kubelet.Kubelet, prefix, class string, n, conc int) ([]time.Duration, time.Duration, error) {
	reqs, err := requests(k, prefix, class, n)
	if err != nil {
		return nil, 0, err
	}
	pub, el, fails := timeAll(reqs, conc, func(req *csi.NodePublishVolumeRequest) error {
		_, err := k.Node.NodePublishVolume(ctx, req)
		return err
	})
	_, _, ufails := timeAll(reqs, conc, unpublisher(ctx, k))
	if fails+ufails > 0 {
		return nil, 0, fmt.Errorf("%d publishes and %d unpublishes failed", fails, ufails)
	}
	return pub, el, nil
}

// measureFloor times the system calls a publish and an unpublish cannot
// avoid, as the driver makes them: a size-capped tmpfs, three 256-byte
// files, a read-only bind onto the target, and both unmounts.
func measureFloor(dir string, n int) (latency, error) {
	data := bytes.Repeat([]byte("x"), 256)
	var ds []time.Duration
	for i := range n {
		src, dst := filepath.Join(dir, fmt.Sprint("src", i)), filepath.Join(dir, fmt.Sprint("dst", i))
		if err := os.MkdirAll(src, 0o700); err != nil {
			return latency{}, err
		}
		if err := os.MkdirAll(dst, 0o700); err != nil {
			return latency{}, err
		}
		t := time.Now()
		if err := unix.Mount("tmpfs", src, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "size=4m,mode=0750"); err != nil {
			return latency{}, err
		}
		for _, name := range []string{"a", "b", "c"} {
			fd, err := unix.Open(filepath.Join(src, name), unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_CLOEXEC, 0o440)
			if err != nil {
				return latency{}, err
			}
			if _, err := unix.Write(fd, data); err != nil {
				return latency{}, err
			}
			unix.Close(fd)
		}
		if err := unix.Mount(src, dst, "", unix.MS_BIND, ""); err != nil {
			return latency{}, err
		}
		if err := unix.Mount("", dst, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
			return latency{}, err
		}
		if err := unix.Unmount(dst, 0); err != nil {
			return latency{}, err
		}
		if err := unix.Unmount(src, 0); err != nil {
			return latency{}, err
		}
		ds = append(ds, time.Since(t))
	}
	return summarize(ds, 0, 0), os.RemoveAll(dir)
}

func measurePostgres(ctx context.Context, k *kubelet.Kubelet, pg *pgtest.Server, n int, r *results) error {
	admin, err := pgx.Connect(ctx, pg.AdminURL())
	if err != nil {
		return err
	}
	defer admin.Close(ctx)
	reqs, err := requests(k, "pg", "pg", n)
	if err != nil {
		return err
	}
	pub, _, fails := timeAll(reqs, 1, func(req *csi.NodePublishVolumeRequest) error {
		_, err := k.Node.NodePublishVolume(ctx, req)
		return err
	})
	if fails > 0 {
		return fmt.Errorf("%d postgres publishes failed", fails)
	}
	p := summarize(pub, 0, 0)
	r.Postgres.PublishP50, r.Postgres.PublishP99 = p.P50, p.P99
	var revoke []time.Duration
	for _, req := range reqs {
		user, err := os.ReadFile(filepath.Join(req.TargetPath, "username"))
		if err != nil {
			return err
		}
		if _, err := k.Node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: req.VolumeId, TargetPath: req.TargetPath}); err != nil {
			return err
		}
		start := time.Now()
		for {
			// Unable to log in: the role is gone or NOLOGIN.
			var canLogin bool
			err := admin.QueryRow(ctx, `SELECT coalesce((SELECT rolcanlogin FROM pg_roles WHERE rolname = $1), false)`, string(user)).Scan(&canLogin)
			if err != nil {
				return err
			}
			if !canLogin {
				break
			}
			if time.Since(start) > 10*time.Second {
				return fmt.Errorf("role %s still logs in 10 s after unpublish", user)
			}
			time.Sleep(time.Millisecond)
		}
		revoke = append(revoke, time.Since(start))
	}
	rv := summarize(revoke, 0, 0)
	r.Postgres.RevokeP50, r.Postgres.RevokeP99 = rv.P50, rv.P99
	return nil
}

// rssMiB reads a process's resident memory, all of it and the anonymous
// part, from /proc/<pid>/status.
func rssMiB(pid int) (total, anon float64, err error) { return resident.MiB(pid) }

func targets(r *results) []target {
	t := func(what string, v, limit float64, unit string, atLeast bool) target {
		met := v <= limit
		if atLeast {
			met = v >= limit
		}
		return target{What: what, Value: v, Limit: limit, Unit: unit, Met: met}
	}
	var bl []target
	if r.Backlog.Volumes > 0 {
		bl = backlogTargets(r.Backlog)
	}
	return append(bl,
		t("publish p50 c1 / floor p50", r.Publish["c1"].P50/r.Floor.CycleP50, 2.5, "x", false),
		t("publish p50 c1", r.Publish["c1"].P50, 0.5, "ms", false),
		t("publish p99 c1", r.Publish["c1"].P99, 2, "ms", false),
		t("publishes/s c16", r.Publish["c16"].OpsPerS, 3*899, "/s", true),
		t("republish p50 c1", r.Republish["c1"].P50, 0.1, "ms", false),
		t("unpublish p50 c1", r.Unpublish["c1"].P50, 0.5, "ms", false),
		t("RSS idle", r.RSS.Idle, 20, "MiB", false),
		t("RSS with 1000 volumes", r.RSS.Volumes, 32, "MiB", false),
		t("postgres publish p50", r.Postgres.PublishP50, 10, "ms", false),
		t("postgres revoke after unpublish p99", r.Postgres.RevokeP99, 1000, "ms", false),
		t("give-back answer to refused p99 (no wait)", r.GiveBack.NoWaitRefusedP99, 50, "ms", false),
		t("give-back answer to refused p99 (wait)", r.GiveBack.WaitRefusedP99, 50, "ms", false),
	)
}

func backlogTargets(b backlog) []target {
	return []target{
		{What: "unpublish p50 backlog / no backlog", Value: b.Growing.P50 / b.NoBacklog.P50, Limit: 1.5, Unit: "x", Met: b.Growing.P50 <= 1.5*b.NoBacklog.P50},
		{What: "unpublish p99 backlog / no backlog", Value: b.Growing.P99 / b.NoBacklog.P99, Limit: 1.5, Unit: "x", Met: b.Growing.P99 <= 1.5*b.NoBacklog.P99},
		{What: "revocations in flight at most", Value: float64(b.MaxInFlight), Limit: 8, Unit: "", Met: b.MaxInFlight >= 8},
	}
}

func printTable(r *results, bin string) {
	fmt.Printf("\nephemeral-secrets-csi benchmark (%s, %d CPUs, %s): real CSI socket, 3 files x 256 B per volume\n\n", filepath.Base(bin), r.Machine.CPUs, r.Machine.Go)
	fmt.Printf("%-34s %9s %9s %10s %8s\n", "row", "p50 ms", "p99 ms", "ops/s", "samples")
	row := func(name string, l latency) {
		ops := "-"
		if l.OpsPerS > 0 {
			ops = fmt.Sprintf("%.0f", l.OpsPerS)
		}
		fmt.Printf("%-34s %9.3f %9.3f %10s %8d\n", name, l.P50, l.P99, ops, l.Samples)
	}
	row("floor: mount cycle (syscalls only)", latency{P50: r.Floor.CycleP50, P99: r.Floor.CycleP99})
	row("rpc round trip (no-op call) c1", r.RPC)
	row("publish c1", r.Publish["c1"])
	row("publish c16", r.Publish["c16"])
	row("republish c1", r.Republish["c1"])
	row("unpublish c1", r.Unpublish["c1"])
	row("unpublish c16", r.Unpublish["c16"])
	row("postgres publish c1", latency{P50: r.Postgres.PublishP50, P99: r.Postgres.PublishP99})
	row("postgres revoke after unpublish", latency{P50: r.Postgres.RevokeP50, P99: r.Postgres.RevokeP99})
	g := r.GiveBack
	row("give-back call, wait", latency{P50: g.WaitCallP50, P99: g.WaitCallP99, Samples: (g.Samples + 1) / 2})
	row("  answer -> login refused", latency{P50: g.WaitRefusedP50, P99: g.WaitRefusedP99, Samples: (g.Samples + 1) / 2})
	row("give-back call, no wait", latency{P50: g.NoWaitCallP50, P99: g.NoWaitCallP99, Samples: g.Samples / 2})
	row("  answer -> login refused", latency{P50: g.NoWaitRefusedP50, P99: g.NoWaitRefusedP99, Samples: g.Samples / 2})
	row("task DELETE: answer -> refused", latency{P50: g.TaskRefusedP50, P99: g.TaskRefusedP99, Samples: g.Samples})
	row("a refused login itself (floor)", latency{P50: g.FloorP50, P99: g.FloorP99, Samples: g.Samples})
	fmt.Printf("\ngive-backs whose first login after the answer was refused: %d of %d", g.FirstAttempt, g.Samples)
	fmt.Printf("\ndriver work in a republish (republish p50 - no-op call p50): %.3f ms\n", r.Republish["c1"].P50-r.RPC.P50)
	fmt.Printf("\n%-44s %10s %10s %12s %12s %8s\n", "resident memory (MiB)", "idle", "anon", "1000 vols", "anon", "binary")
	mem := func(name string, m memory, mb float64) {
		vols, volsAnon := "-", "-"
		if m.Volumes > 0 {
			vols, volsAnon = fmt.Sprintf("%.1f", m.Volumes), fmt.Sprintf("%.1f", m.VolumesAnon)
		}
		size := "-"
		if mb > 0 {
			size = fmt.Sprintf("%.1f MB", mb)
		}
		fmt.Printf("%-44s %10.1f %10.1f %12s %12s %8s\n", name, m.Idle, m.IdleAnon, vols, volsAnon, size)
	}
	mem("node plugin ("+filepath.Base(bin)+")", r.RSS, r.BinaryMB.Node)
	if r.RSSBefore != nil {
		mem("  before (the earlier commit's, same run)", *r.RSSBefore, r.BinaryMB.Before)
	}
	if r.RSSAWS != nil {
		mem("aws node plugin (aws section loaded)", *r.RSSAWS, r.BinaryMB.AWS)
	}
	mem("all-in-one as node plugin, issuer in process", r.RSSAll, r.BinaryMB.All)
	mem("issuer (all-in-one issuer, leading)", r.RSSIssuer, 0)
	fmt.Println("(anon: heap and stacks; the rest is the binary's own file-backed pages)")
	if b := r.RSSBefore; b != nil && b.Idle > 0 && b.Volumes > 0 && r.BinaryMB.Before > 0 {
		fmt.Printf("node plugin / before: RSS idle %.2fx, with 1000 volumes %.2fx, binary %.2fx\n\n",
			r.RSS.Idle/b.Idle, r.RSS.Volumes/b.Volumes, r.BinaryMB.Node/r.BinaryMB.Before)
	} else {
		fmt.Println()
	}
	if b := r.Backlog; b.Volumes > 0 {
		printBacklog(b)
	}
	printTargets(r.Targets)
}

func printBacklog(b backlog) {
	fmt.Printf("revocation backlog, %d PostgreSQL volumes (load average %.1f at its start):\n", b.Volumes, b.Load)
	fmt.Printf("  unpublish c1, no backlog:       p50 %.3f ms  p99 %.3f ms\n", b.NoBacklog.P50, b.NoBacklog.P99)
	fmt.Printf("  unpublish c1, backlog growing:  p50 %.3f ms  p99 %.3f ms (backend down)\n", b.Growing.P50, b.Growing.P99)
	fmt.Printf("  driver CPU, no backlog:         %.2f s over %.1f s (its revocations made meanwhile)\n", b.CPUNoBacklog, b.NoBacklogS)
	fmt.Printf("  driver CPU while queueing:      %.2f s over %.1f s; %d queued when the backend came back\n", b.CPUSeconds, b.QueueingS, b.QueueDepth)
	fmt.Printf("  backend back -> queue empty and every role gone: %.2f s (%.0f revocations/s; peak %d in one second; at most %d in flight)\n\n",
		b.DrainS, b.PerSecond, b.PeakPerSecond, b.MaxInFlight)
}

func printTargets(ts []target) {
	fmt.Printf("%-38s %10s %10s  %s\n", "target", "measured", "limit", "")
	for _, t := range ts {
		mark := "met"
		if !t.Met {
			mark = "MISSED"
		}
		fmt.Printf("%-38s %10.3f %10s  %s\n", t.What, t.Value, fmt.Sprintf("%g %s", t.Limit, t.Unit), mark)
	}
}

const classesYAML = `apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: static
  namespace: bench
spec:
  provider: static
---
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: pg
  namespace: bench
spec:
  provider: postgres
  parameters:
    connection: main
    role: bench
---
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: pg-tasks
  namespace: bench
spec:
  provider: postgres
  parameters:
    connection: main
    role: bench
    leaseAPI: "true"
`

// awsBackendsYAML is the aws node plugin's backend file: an aws section,
// so the provider is built as in a cluster (it connects to nothing until
// a class uses it; the benchmark's classes use the static provider).
const awsBackendsYAML = "aws:\n  region: eu-west-1\n"

// writeAWSBackends writes awsBackendsYAML into dir and returns its path.
func writeAWSBackends(dir string) (string, error) {
	path := filepath.Join(dir, "backends-aws.yaml")
	return path, os.WriteFile(path, []byte(awsBackendsYAML), 0o600)
}

const backendsYAML = `postgres:
  connections:
    main:
      url: %s
      maxConns: 8
      roles:
        bench:
          creationStatements:
            - CREATE ROLE "{{.Name}}" LOGIN PASSWORD '{{.Password}}' VALID UNTIL '{{.Expiration}}'
          allowed:
            - namespace: bench
              serviceAccount: bench
`
