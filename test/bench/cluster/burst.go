package main

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	watchtools "k8s.io/client-go/tools/watch"

	"github.com/ephemeral-secrets/csi-driver/pkg/apis/ephemeralsecrets/v1alpha1"
	"github.com/ephemeral-secrets/csi-driver/pkg/inventory"
	"github.com/ephemeral-secrets/csi-driver/test/node"
)

// The burst's two kinds, interleaved: our volume with the postgres
// example's class (a role minted by the issuer) and an in-memory emptyDir.
// Both run the pause container, so the volume is their one difference;
// the bench logs in with each postgres pod's credential itself.
var burstKinds = []kind{
	{"postgres", csiVolume("orders-db"), pause},
	{"emptyDir", emptyDir, pause},
}

// cleanBound bounds the wait for every credential of a round to be
// revoked and its record removed after the pods are gone.
const cleanBound = 3 * time.Minute

// BurstSample is one pod of a burst, in milliseconds from the burst's
// start (the moment every Create call was launched).
type BurstSample struct {
	Kind      string   `json:"kind"`
	Pod       string   `json:"pod"`
	Created   float64  `json:"createdMs"`   // its Create call returned
	Scheduled float64  `json:"scheduledMs"` // bound to the node
	Running   float64  `json:"runningMs"`   // phase Running
	Warnings  []string `json:"warnings,omitempty"`
}

// BurstRound is one burst: its pods, its wall times and its summary.
type BurstRound struct {
	Round int `json:"round"`
	Pods  int `json:"pods"`
	// AllRunning: the burst's start → the last pod Running.
	AllRunning float64 `json:"allRunningMs"`
	// Running per kind: the burst's start → each pod Running.
	Running map[string]Stats `json:"runningMs"`
	// Ratio is the postgres pods' median over the emptyDir pods'.
	Ratio float64 `json:"medianRatioToEmptyDir"`
	// AllGone: the DeleteCollection call → the last pod gone from the API;
	// Clean: → no Credential object and no role of the round left.
	AllGone float64 `json:"allGoneMs"`
	Clean   float64 `json:"cleanMs"`
	// Publish is the node plugin's NodePublishVolume time (kubelet's call)
	// per postgres volume, Mint the issuer's mean mint within it, from
	// their own histograms: where the postgres pods' extra time goes.
	Publish Timing `json:"nodePublishVolume"`
	Mint    Timing `json:"issuerMint"`
	// LoadAvg is /proc/loadavg at the start and at the end of the round.
	LoadAvg  [2]string     `json:"loadavg"`
	Capacity Capacity      `json:"capacity"`
	Samples  []BurstSample `json:"samples"`
}

// Capacity is what bounds how many pods the node holds, as seen at the
// burst's peak (every pod Running).
type Capacity struct {
	AllocatablePods int64  `json:"allocatablePods"` // kubelet's maxPods
	PodsOnNode      int    `json:"podsOnNode"`
	PodSubnet       string `json:"podSubnet"`
	// ContainerdOpenFiles: containerd's soft RLIMIT_NOFILE and its open fds.
	ContainerdOpenFiles [2]int `json:"containerdOpenFiles"`
	// Inotify: inotify instances open on the machine, and the per-user limit.
	Inotify [2]int `json:"inotifyInstances"`
}

// burst runs rounds bursts of size pods: each creates the pods at once,
// waits until all are Running, checks every postgres pod's credential
// logs in and has its Credential object, deletes the pods at once and
// waits until no credential of the round is left.
func burst(ctx context.Context, n *node.Node, db *node.Database, size, rounds int, logf func(string, ...any)) ([]BurstRound, error) {
	// client-go's default 5 requests a second would serialise the burst
	// in the client: no limit, as a controller scaling a Deployment has
	// none that low.
	cfg := rest.CopyConfig(n.Config())
	cfg.QPS = -1
	clients, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, err
	}
	inv, err := inventory.NewClient(cfg)
	if err != nil {
		return nil, err
	}
	var out []BurstRound
	for r := 1; r <= rounds; r++ {
		logf("burst %d of %d: %d pods", r, rounds, size)
		br, err := burstRound(ctx, clients, inv, n, db, r, size)
		if err != nil {
			return out, fmt.Errorf("burst %d: %w", r, err)
		}
		logf("burst %d: all Running after %.0f ms; postgres p50 %.0f ms, emptyDir p50 %.0f ms; clean %.0f ms after the delete",
			r, br.AllRunning, br.Running["postgres"].Median, br.Running["emptyDir"].Median, br.Clean)
		out = append(out, br)
	}
	return out, nil
}

func burstRound(ctx context.Context, clients kubernetes.Interface, inv *inventory.Client, n *node.Node, db *node.Database, round, size int) (BurstRound, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	br := BurstRound{Round: round, Pods: size, LoadAvg: [2]string{loadavg(), ""}}
	api := clients.CoreV1().Pods(namespace)
	label := "burst=" + strconv.Itoa(round)
	pods := make([]*corev1.Pod, size)
	for i := range pods {
		k := burstKinds[i%len(burstKinds)]
		pods[i] = k.pod(fmt.Sprintf("burst%d-%s-%03d", round, strings.ToLower(k.name), i/len(burstKinds)))
		pods[i].Labels["burst"] = strconv.Itoa(round)
	}
	if err := roomFor(ctx, clients, size); err != nil {
		return br, err
	}
	publish0, err := publishHistogram.read(ctx, clients)
	if err != nil {
		return br, err
	}
	mint0, err := mintHistogram.read(ctx, clients)
	if err != nil {
		return br, err
	}
	w, err := podWatch(ctx, api, label)
	if err != nil {
		return br, err
	}
	defer w.Stop()

	type created struct {
		i   int
		at  time.Duration
		err error
	}
	done := make(chan created, size)
	start := time.Now()
	for i, p := range pods {
		go func() {
			_, err := api.Create(ctx, p, metav1.CreateOptions{})
			done <- created{i, time.Since(start), err}
		}()
	}
	samples := make(map[string]*BurstSample, size)
	for _, p := range pods {
		samples[p.Name] = &BurstSample{Kind: p.Labels["kind"], Pod: p.Name}
	}
	last := map[string]*corev1.Pod{}
	running, calls := 0, 0
	for running < size || calls < size {
		select {
		case c := <-done:
			if c.err != nil {
				return br, fmt.Errorf("creating pod %s: %w", pods[c.i].Name, c.err)
			}
			samples[pods[c.i].Name].Created = ms(c.at)
			calls++
		case ev, ok := <-w.ResultChan():
			if !ok {
				return br, fmt.Errorf("the watch ended with %d of %d pods Running (%v)", running, size, ctx.Err())
			}
			p, isPod := ev.Object.(*corev1.Pod)
			if !isPod {
				return br, fmt.Errorf("watch: %s %v", ev.Type, ev.Object)
			}
			s := samples[p.Name]
			if s == nil {
				continue
			}
			if p.Status.Phase == corev1.PodFailed {
				return br, fmt.Errorf("pod %s failed: %s", p.Name, p.Status.Message)
			}
			at := ms(time.Since(start))
			if s.Scheduled == 0 && p.Spec.NodeName != "" {
				s.Scheduled = at
			}
			if s.Running == 0 && p.Status.Phase == corev1.PodRunning {
				s.Running = at
				running++
			}
			last[p.Name] = p
		}
	}
	br.AllRunning = ms(time.Since(start))
	br.Capacity = capacity(ctx, clients)
	publish, err := publishHistogram.read(ctx, clients)
	if err != nil {
		return br, err
	}
	mint, err := mintHistogram.read(ctx, clients)
	if err != nil {
		return br, err
	}
	volumes := 0
	for _, p := range pods {
		br.Samples = append(br.Samples, *samples[p.Name])
		if p.Spec.Volumes[0].CSI != nil {
			volumes++
		}
	}
	br.Publish, br.Mint = publish.since(publish0, volumes), mint.since(mint0, 0)
	if err := checkBurst(ctx, clients, inv, db, br.Samples, last); err != nil {
		return br, err
	}
	br.Running = map[string]Stats{}
	for _, k := range burstKinds {
		var v []float64
		for _, s := range br.Samples {
			if s.Kind == k.name {
				v = append(v, s.Running)
			}
		}
		br.Running[k.name] = stats(v)
	}
	br.Ratio = br.Running["postgres"].Median / br.Running["emptyDir"].Median

	// Delete them at once, as a Deployment scaled to zero would.
	start = time.Now()
	if err := api.DeleteCollection(ctx, metav1.DeleteOptions{}, metav1.ListOptions{LabelSelector: label}); err != nil {
		return br, err
	}
	for gone := 0; gone < size; {
		ev, ok := <-w.ResultChan()
		if !ok {
			return br, fmt.Errorf("the watch ended with %d of %d pods gone (%v)", gone, size, ctx.Err())
		}
		if ev.Type == watch.Deleted {
			gone++
		}
	}
	br.AllGone = ms(time.Since(start))
	if err := n.WaitNoCredentials(ctx, db, namespace, node.ExampleRolePrefix, cleanBound); err != nil {
		return br, fmt.Errorf("after the pods were deleted: %w", err)
	}
	br.Clean = ms(time.Since(start))
	br.LoadAvg[1] = loadavg()
	return br, nil
}

// podWatch watches the pods of a label from now on, and resumes where it
// was when the API server ends the watch: under a burst the watch cache
// drops a watcher that falls behind.
func podWatch(ctx context.Context, api typedcorev1.PodInterface, label string) (watch.Interface, error) {
	l, err := api.List(ctx, metav1.ListOptions{LabelSelector: label})
	if err != nil {
		return nil, err
	}
	return watchtools.NewRetryWatcherWithContext(ctx, l.ResourceVersion, &cache.ListWatch{
		WatchFuncWithContext: func(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error) {
			opts.LabelSelector = label
			return api.Watch(ctx, opts)
		},
	})
}

// roomFor refuses a burst the node cannot hold beside the pods it runs.
func roomFor(ctx context.Context, clients kubernetes.Interface, size int) error {
	nd, err := clients.CoreV1().Nodes().Get(ctx, node.Name, metav1.GetOptions{})
	if err != nil {
		return err
	}
	pods, err := clients.CoreV1().Pods("").List(ctx, metav1.ListOptions{FieldSelector: "spec.nodeName=" + node.Name})
	if err != nil {
		return err
	}
	if max := nd.Status.Allocatable.Pods().Value(); int64(len(pods.Items)+size) > max {
		return fmt.Errorf("the node holds at most %d pods (kubelet's maxPods) and runs %d: no room for a burst of %d", max, len(pods.Items), size)
	}
	return nil
}

// checkBurst proves the burst's pods had working volumes: each postgres
// pod's credential, read from its volume as kubelet mounted it, logs in
// and reads the table its role may read, and the inventory holds an
// Issued Credential for it (so the issuer minted it). It records each
// pod's Warning events (but kubelet's MissingClusterDNS).
func checkBurst(ctx context.Context, clients kubernetes.Interface, inv *inventory.Client, db *node.Database, samples []BurstSample, pods map[string]*corev1.Pod) error {
	creds, err := inv.List(ctx, namespace, metav1.ListOptions{})
	if err != nil {
		return err
	}
	issued := map[string]bool{}
	for _, c := range creds.Items {
		if c.Status.State == v1alpha1.StateIssued && c.Spec.Provider == "postgres" {
			issued[c.Labels[v1alpha1.LabelPodUID]] = true
		}
	}
	evs, err := clients.CoreV1().Events(namespace).List(ctx, metav1.ListOptions{FieldSelector: "type=Warning"})
	if err != nil {
		return err
	}
	for i, s := range samples {
		for _, e := range evs.Items {
			if e.InvolvedObject.Name == s.Pod && e.Reason != "MissingClusterDNS" {
				samples[i].Warnings = append(samples[i].Warnings, fmt.Sprintf("%s ×%d: %s", e.Reason, e.Count, e.Message))
			}
		}
		if s.Kind != "postgres" {
			continue
		}
		p := pods[s.Pod]
		if !issued[string(p.UID)] {
			return fmt.Errorf("pod %s: no Issued Credential of provider postgres in the inventory", s.Pod)
		}
		if err := logIn(ctx, db, p); err != nil {
			return fmt.Errorf("pod %s: %w", s.Pod, err)
		}
	}
	return nil
}

// logIn logs in with the credential of the pod's volume and reads the
// table the example's role may read.
func logIn(ctx context.Context, db *node.Database, p *corev1.Pod) error {
	// this process runs in the node's mount namespace
	dir := filepath.Join("/var/lib/kubelet/pods", string(p.UID), "volumes/kubernetes.io~csi/db/mount")
	user, err1 := os.ReadFile(filepath.Join(dir, "username"))
	password, err2 := os.ReadFile(filepath.Join(dir, "password"))
	if err := errors.Join(err1, err2); err != nil {
		return fmt.Errorf("reading its volume: %w", err)
	}
	conn, err := pgx.Connect(ctx, db.URLFor(string(user), string(password), "shop"))
	if err != nil {
		// pgx's error names the user, never the password
		return fmt.Errorf("logging in with its credential: %w", err)
	}
	defer conn.Close(ctx)
	var orders int
	if err := conn.QueryRow(ctx, "SELECT count(*) FROM orders").Scan(&orders); err != nil {
		return fmt.Errorf("reading orders with its credential: %w", err)
	}
	return nil
}

// capacity reads what bounds the node's pods.
func capacity(ctx context.Context, clients kubernetes.Interface) Capacity {
	c := Capacity{PodSubnet: node.PodSubnet}
	if nd, err := clients.CoreV1().Nodes().Get(ctx, node.Name, metav1.GetOptions{}); err == nil {
		c.AllocatablePods = nd.Status.Allocatable.Pods().Value()
	}
	if pods, err := clients.CoreV1().Pods("").List(ctx, metav1.ListOptions{FieldSelector: "spec.nodeName=" + node.Name}); err == nil {
		c.PodsOnNode = len(pods.Items)
	}
	procs, _ := filepath.Glob("/proc/[0-9]*")
	for _, proc := range procs {
		fds, _ := os.ReadDir(filepath.Join(proc, "fd"))
		if comm, _ := os.ReadFile(filepath.Join(proc, "comm")); strings.TrimSpace(string(comm)) == "containerd" {
			c.ContainerdOpenFiles = [2]int{softNoFile(proc), len(fds)}
		}
		for _, fd := range fds {
			if l, _ := os.Readlink(filepath.Join(proc, "fd", fd.Name())); l == "anon_inode:inotify" {
				c.Inotify[0]++
			}
		}
	}
	if b, err := os.ReadFile("/proc/sys/fs/inotify/max_user_instances"); err == nil {
		c.Inotify[1], _ = strconv.Atoi(strings.TrimSpace(string(b)))
	}
	return c
}

// softNoFile is a process's soft limit of open files (0: unknown).
func softNoFile(proc string) int {
	b, err := os.ReadFile(filepath.Join(proc, "limits"))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(strings.TrimPrefix(line, "Max open files")); len(f) >= 2 && strings.HasPrefix(line, "Max open files") {
			v, _ := strconv.Atoi(f[0])
			return v
		}
	}
	return 0
}

func loadavg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	return strings.Join(strings.Fields(string(b))[:min(3, len(strings.Fields(string(b))))], " ")
}

// burstMedians are the median over rounds of each round's figures.
type burstMedians struct {
	AllRunning  float64 `json:"allRunningMs"`
	PostgresP50 float64 `json:"postgresRunningP50Ms"`
	PostgresP90 float64 `json:"postgresRunningP90Ms"`
	EmptyDirP50 float64 `json:"emptyDirRunningP50Ms"`
	EmptyDirP90 float64 `json:"emptyDirRunningP90Ms"`
	Ratio       float64 `json:"medianRatioToEmptyDir"`
	AllGone     float64 `json:"allGoneMs"`
	Clean       float64 `json:"cleanMs"`
	Publish     Timing  `json:"nodePublishVolume"`
	Mint        Timing  `json:"issuerMint"`
}

func mediansOf(rounds []BurstRound) burstMedians {
	med := func(f func(BurstRound) float64) float64 {
		var v []float64
		for _, r := range rounds {
			v = append(v, f(r))
		}
		return stats(v).Median
	}
	return burstMedians{
		AllRunning:  med(func(r BurstRound) float64 { return r.AllRunning }),
		PostgresP50: med(func(r BurstRound) float64 { return r.Running["postgres"].Median }),
		PostgresP90: med(func(r BurstRound) float64 { return r.Running["postgres"].P90 }),
		EmptyDirP50: med(func(r BurstRound) float64 { return r.Running["emptyDir"].Median }),
		EmptyDirP90: med(func(r BurstRound) float64 { return r.Running["emptyDir"].P90 }),
		Ratio:       med(func(r BurstRound) float64 { return r.Ratio }),
		AllGone:     med(func(r BurstRound) float64 { return r.AllGone }),
		Clean:       med(func(r BurstRound) float64 { return r.Clean }),
		Publish:     Timing{MeanMs: med(func(r BurstRound) float64 { return r.Publish.MeanMs })},
		Mint:        Timing{MeanMs: med(func(r BurstRound) float64 { return r.Mint.MeanMs })},
	}
}

// printBurst prints the burst's table: one row a round, then the medians.
func printBurst(rounds []BurstRound) {
	if len(rounds) == 0 {
		return
	}
	fmt.Printf("\nburst: %d pods created at once, half postgres (through the issuer), half emptyDir, interleaved; ms after the burst's start\n", rounds[0].Pods)
	fmt.Printf("%-7s %11s  %-20s %-20s %11s %9s %9s  %-15s %-15s %s\n", "round", "all Running", "postgres p50/p90", "emptyDir p50/p90",
		"pg/emptyDir", "all gone", "clean", "publish/volume", "mint (mean)", "loadavg (start; end)")
	row := func(name string, m burstMedians, publish, mint Timing, load string) {
		fmt.Printf("%-7s %11.0f  %9.0f %9.0f  %9.0f %9.0f  %11.2f %9.0f %9.0f  %-15s %-15s %s\n", name, m.AllRunning, m.PostgresP50, m.PostgresP90,
			m.EmptyDirP50, m.EmptyDirP90, m.Ratio, m.AllGone, m.Clean, publish, mint, load)
	}
	for _, r := range rounds {
		row(strconv.Itoa(r.Round), mediansOf([]BurstRound{r}), r.Publish, r.Mint, r.LoadAvg[0]+"; "+r.LoadAvg[1])
	}
	if len(rounds) > 1 {
		m := mediansOf(rounds)
		row("median", m, m.Publish, m.Mint, "")
	}
	c := rounds[len(rounds)-1].Capacity
	fmt.Printf("at the peak: %d pods on the node of at most %d (maxPods), pod subnet %s, containerd %d open files of %d, inotify instances %d (limit %d a user)\n",
		c.PodsOnNode, c.AllocatablePods, c.PodSubnet, c.ContainerdOpenFiles[1], c.ContainerdOpenFiles[0], c.Inotify[0], c.Inotify[1])
	warned := map[string]int{}
	for _, r := range rounds {
		for _, s := range r.Samples {
			if len(s.Warnings) > 0 {
				warned[s.Kind]++
			}
		}
	}
	for _, k := range slices.Sorted(maps.Keys(warned)) {
		fmt.Printf("burst: %d %s pods had Warning events (see the JSON)\n", warned[k], k)
	}
}
