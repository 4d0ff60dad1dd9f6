// Command cluster measures what our volume adds to a pod's start-up in a
// real cluster (make bench-cluster): the single-node cluster of package
// node, the driver installed from the chart with helm (PostgreSQL through
// the issuer, providers.postgres.enabled), built with the
// benchmark's extra provider "static" (test/bench/driver), and PostgreSQL
// with the postgres example's database. It creates pods one at a time,
// each once the one before is Running, interleaving three kinds: our
// volume with the static provider, our volume with the example's postgres
// class (db-check logs in with it), and an emptyDir. It times the Create
// call to the Running phase seen on a watch, then deletes the pods in the
// same order, timing the Delete call to the pod gone.
//
// Then the burst row: --burst pods created at once (concurrent Create
// calls, no client-side rate limit), half with our volume and the
// postgres example's class, its role minted by the issuer (the chart's
// Deployment, providers.postgres.enabled), half with an in-memory
// emptyDir, interleaved, all running the pause container. It times the
// burst's start to each pod Running and to the last, checks each
// postgres pod's credential logs in and has its Credential, deletes the
// pods at once and waits until no Credential object and no role of them
// is left (a leak fails the run). --burst-rounds repeats it.
//
// It prints the tables and writes the samples and their summaries as JSON.
//
//	go run ./test/bench/cluster [--pods 20] [--burst 100] [--burst-rounds 3] [--out bench-cluster-results.json]
//
// The burst alone: --pods 0 (after make postgres node).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"

	"github.com/ephemeral-secrets/csi-driver/test/image"
	"github.com/ephemeral-secrets/csi-driver/test/kube"
	"github.com/ephemeral-secrets/csi-driver/test/node"
)

// The pods run in the postgres example's namespace, as its service account.
const (
	namespace      = "ai-agents"
	serviceAccount = "research-agent"
	staticClass    = `apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata: {name: static, namespace: ` + namespace + `}
spec: {provider: static}
`
)

// A kind of pod: the volume it mounts and the container that runs.
type kind struct {
	name      string
	volume    corev1.VolumeSource
	container corev1.Container
}

func csiVolume(class string) corev1.VolumeSource {
	ro := true
	return corev1.VolumeSource{CSI: &corev1.CSIVolumeSource{Driver: "ephemeral-secrets.csi.dev", ReadOnly: &ro,
		VolumeAttributes: map[string]string{"secretProviderClass": class}}}
}

var (
	pause = corev1.Container{Name: "app", Image: image.PauseImage}
	kinds = []kind{
		{"static", csiVolume("static"), pause},
		{"postgres", csiVolume("orders-db"), corev1.Container{Name: "app", Image: node.DBCheckImage, Args: []string{
			"--env-file=/run/secrets/db/pg.env", "--allowed=SELECT count(*) FROM orders",
			"--forbidden=SELECT count(*) FROM customers", "--hold=30s"}}},
		{"emptyDir", emptyDir, pause},
	}
	// medium Memory: kubelet mounts a tmpfs, as the driver does
	emptyDir = corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{Medium: corev1.StorageMediumMemory}}
)

// pod is a pod of kind k, with the example workload's security settings.
func (k kind) pod(name string) *corev1.Pod {
	no, yes, uid, gid, fsGroup := false, true, int64(1000), int64(1000), int64(2000)
	c := k.container
	c.ImagePullPolicy = corev1.PullNever
	c.VolumeMounts = []corev1.VolumeMount{{Name: "db", MountPath: "/run/secrets/db", ReadOnly: true}}
	c.SecurityContext = &corev1.SecurityContext{AllowPrivilegeEscalation: &no, ReadOnlyRootFilesystem: &yes,
		Capabilities: &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}}}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: namespace, Labels: map[string]string{"kind": k.name}},
		Spec: corev1.PodSpec{
			ServiceAccountName: serviceAccount,
			SecurityContext: &corev1.PodSecurityContext{RunAsUser: &uid, RunAsGroup: &gid, FSGroup: &fsGroup, RunAsNonRoot: &yes,
				SeccompProfile: &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault}},
			Containers: []corev1.Container{c},
			Volumes:    []corev1.Volume{{Name: "db", VolumeSource: k.volume}},
		},
	}
}

// Sample is one pod's times, in milliseconds from the API call.
type Sample struct {
	Kind      string  `json:"kind"`
	Pod       string  `json:"pod"`
	Scheduled float64 `json:"scheduledMs"` // Create → the pod bound to the node
	Container float64 `json:"containerMs"` // Create → containerd created the container (volumes set up)
	Running   float64 `json:"runningMs"`   // Create → phase Running
	Gone      float64 `json:"goneMs"`      // Delete → the pod removed from the API
	// Warnings are the pod's Warning events (a retried mount, say) but
	// kubelet's MissingClusterDNS: the node runs no cluster DNS.
	Warnings []string `json:"warnings,omitempty"`
}

func main() {
	if !node.Inside() {
		os.Exit(node.RunInside())
	}
	perKind := flag.Int("pods", 20, "pods of each kind, one at a time (0: none)")
	burstSize := flag.Int("burst", 100, "pods of a burst, half of each kind (0: no burst)")
	rounds := flag.Int("burst-rounds", 3, "bursts, one after the other")
	out := flag.String("out", "bench-cluster-results.json", "JSON results")
	flag.Parse()
	if err := run(context.Background(), *perKind, *burstSize, *rounds, *out); err != nil {
		fmt.Fprintln(os.Stderr, "bench-cluster:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, perKind, burstSize, rounds int, out string) error {
	logf := func(format string, args ...any) { fmt.Printf(time.Now().Format("15:04:05 ")+format+"\n", args...) }
	root, err := os.Getwd()
	if err != nil {
		return err
	}
	work, err := os.MkdirTemp("", "esc-bench-cluster-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	if err := os.Mkdir(filepath.Join(work, "images"), 0o755); err != nil {
		return err
	}
	logf("building images (the driver from ./test/bench/driver)")
	images, err := node.ImagesOf(ctx, root, filepath.Join(work, "images"), "./test/bench/driver")
	if err != nil {
		return err
	}
	n, err := node.Start(ctx, node.Options{Work: filepath.Join(work, "node"), Images: images, PauseImage: image.PauseImage, Logf: logf})
	if err != nil {
		return err
	}
	defer n.Stop()
	db, err := node.StartDatabase(ctx)
	if err != nil {
		return err
	}
	defer db.Close()
	backends, err := db.ExampleBackends(root)
	if err != nil {
		return err
	}
	logf("installing the driver with helm, PostgreSQL through the issuer")
	if err := n.InstallDriver(ctx, root, backends, node.PostgresProfile()...); err != nil {
		return err
	}
	for _, f := range []string{"namespace.yaml", "secretproviderclass.yaml"} {
		data, err := os.ReadFile(filepath.Join(root, "examples/postgres", f))
		if err != nil {
			return err
		}
		if err := kube.Apply(ctx, n.Config(), data, false); err != nil {
			return fmt.Errorf("%s: %w", f, err)
		}
	}
	if err := kube.Apply(ctx, n.Config(), []byte(staticClass), false); err != nil {
		return err
	}

	var samples []Sample
	if perKind > 0 {
		if samples, err = measure(ctx, n, perKind, logf); err != nil {
			logf("%s", n.Describe(ctx))
			return err
		}
		if err := n.WaitNoCredentials(ctx, db, namespace, node.ExampleRolePrefix, cleanBound); err != nil {
			return fmt.Errorf("after the pods one at a time: %w", err)
		}
	}
	var bursts []BurstRound
	if burstSize > 0 {
		if bursts, err = burst(ctx, n, db, burstSize, rounds, logf); err != nil {
			logf("%s", n.Describe(ctx))
			return err
		}
	}
	return report(samples, bursts, out)
}

// measure starts a warm-up pod of each kind (not counted), then perKind
// rounds of one pod of each kind, checks that each of our pods got its
// credential, and deletes them all.
func measure(ctx context.Context, n *node.Node, perKind int, logf func(string, ...any)) ([]Sample, error) {
	pods := n.Clients.CoreV1().Pods(namespace)
	var samples []Sample
	for round := 0; round <= perKind; round++ {
		for _, k := range kinds {
			p := k.pod(fmt.Sprintf("%s-%02d", strings.ToLower(k.name), round))
			t, err := timed(ctx, n, p.Name, func() error { _, err := pods.Create(ctx, p, metav1.CreateOptions{}); return err },
				func(p *corev1.Pod) bool { return p.Spec.NodeName != "" },
				func(p *corev1.Pod) bool { return p.Status.Phase == corev1.PodRunning })
			if err != nil {
				return nil, err
			}
			created, err := containerCreated(t.pod)
			if err != nil {
				return nil, err
			}
			if round > 0 {
				samples = append(samples, Sample{Kind: k.name, Pod: p.Name, Scheduled: ms(t.after[0]),
					Container: ms(created.Sub(t.start)), Running: ms(t.after[1])})
			}
		}
		if round%5 == 0 {
			logf("round %d of %d", round, perKind)
		}
	}
	if err := check(ctx, n, samples); err != nil {
		return nil, err
	}
	logf("deleting the pods")
	for i := range samples {
		t, err := timed(ctx, n, samples[i].Pod, func() error { return pods.Delete(ctx, samples[i].Pod, metav1.DeleteOptions{}) }, nil)
		if err != nil {
			return nil, err
		}
		samples[i].Gone = ms(t.after[0])
	}
	n.DeleteWorkloads(ctx, 2*time.Minute) // the warm-up pods
	return samples, nil
}

// timing is when act was called, how long after it each mark was first
// true, and the pod as the last mark saw it.
type timing struct {
	start time.Time
	after []time.Duration
	pod   *corev1.Pod
}

// timed opens a watch on the pod, calls act, and returns when each mark
// was first true; a nil mark is the pod's deletion. It returns when the
// last mark is seen.
func timed(ctx context.Context, n *node.Node, name string, act func() error, marks ...func(*corev1.Pod) bool) (timing, error) {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	// From the watch cache's state, whatever it is ("0"): the API server
	// refuses a watch from etcd's newest revision while its cache of pods
	// lags behind it (504, too large resource version), and the events
	// after any state before act include act's.
	w, err := n.Clients.CoreV1().Pods(namespace).Watch(ctx, metav1.ListOptions{FieldSelector: "metadata.name=" + name, ResourceVersion: "0"})
	if err != nil {
		return timing{}, err
	}
	defer w.Stop()
	start := time.Now()
	if err := act(); err != nil {
		return timing{}, err
	}
	seen := make([]time.Duration, len(marks))
	for ev := range w.ResultChan() {
		p, ok := ev.Object.(*corev1.Pod)
		if !ok {
			return timing{}, fmt.Errorf("pod %s: watch: %s %v", name, ev.Type, ev.Object)
		}
		if p.Status.Phase == corev1.PodFailed {
			return timing{}, fmt.Errorf("pod %s failed: %s", name, p.Status.Message)
		}
		for i, mark := range marks {
			if seen[i] == 0 && ((mark == nil && ev.Type == watch.Deleted) || (mark != nil && mark(p))) {
				seen[i] = time.Since(start)
			}
		}
		if seen[len(seen)-1] != 0 {
			return timing{start, seen, p}, nil
		}
	}
	return timing{}, fmt.Errorf("pod %s: the watch ended first (%v)", name, ctx.Err())
}

// containerCreated is when containerd created the pod's container, with
// containerd's nanoseconds (the API's times are whole seconds): after the
// sandbox and the volumes, before the container starts. The node runs on
// this machine's clock.
func containerCreated(p *corev1.Pod) (time.Time, error) {
	if len(p.Status.ContainerStatuses) == 0 {
		return time.Time{}, fmt.Errorf("pod %s: no container status", p.Name)
	}
	out, err := node.Ctr("containers", "info", strings.TrimPrefix(p.Status.ContainerStatuses[0].ContainerID, "containerd://"))
	if err != nil {
		return time.Time{}, err
	}
	var info struct{ CreatedAt time.Time }
	if err := json.Unmarshal(out, &info); err != nil || info.CreatedAt.IsZero() {
		return time.Time{}, fmt.Errorf("pod %s: containerd's container info: %v", p.Name, err)
	}
	return info.CreatedAt, nil
}

// check proves the pods measured had working volumes: each postgres pod's
// db-check logged in and was refused the forbidden query; each static
// pod's volume holds the provider's value. It records each pod's warnings.
func check(ctx context.Context, n *node.Node, samples []Sample) error {
	refused := regexp.MustCompile(`forbidden query refused: .*42501`)
	evs, err := n.Clients.CoreV1().Events(namespace).List(ctx, metav1.ListOptions{FieldSelector: "type=Warning"})
	if err != nil {
		return err
	}
	for i, s := range samples {
		for _, e := range evs.Items {
			if e.InvolvedObject.Name == s.Pod && e.Reason != "MissingClusterDNS" {
				samples[i].Warnings = append(samples[i].Warnings, fmt.Sprintf("%s ×%d: %s", e.Reason, e.Count, e.Message))
			}
		}
		p, err := n.Clients.CoreV1().Pods(namespace).Get(ctx, s.Pod, metav1.GetOptions{})
		if err != nil {
			return err
		}
		switch s.Kind {
		case "postgres":
			var logs []byte
			for deadline := time.Now().Add(time.Minute); !refused.Match(logs) && time.Now().Before(deadline); time.Sleep(500 * time.Millisecond) {
				logs, _ = n.Clients.CoreV1().Pods(namespace).GetLogs(s.Pod, &corev1.PodLogOptions{}).DoRaw(ctx)
			}
			if !refused.Match(logs) {
				return fmt.Errorf("pod %s: db-check did not finish its checks: %s", s.Pod, logs)
			}
		case "static":
			// this process runs in the node's mount namespace
			b, err := os.ReadFile(filepath.Join("/var/lib/kubelet/pods", string(p.UID), "volumes/kubernetes.io~csi/db/mount/username"))
			if err != nil || string(b) != strings.Repeat("u", 256) {
				return errors.Join(fmt.Errorf("pod %s: the static volume does not hold the provider's value", s.Pod), err)
			}
		}
	}
	return nil
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// Stats summarise one column of one kind.
type Stats struct {
	Median float64 `json:"median"`
	P90    float64 `json:"p90"`
	Max    float64 `json:"max"`
}

// stats by nearest rank.
func stats(v []float64) Stats {
	v = slices.Sorted(slices.Values(v))
	rank := func(q float64) float64 { return v[max(0, int(q*float64(len(v))+0.999999)-1)] }
	return Stats{Median: rank(0.5), P90: rank(0.9), Max: v[len(v)-1]}
}

// Summary is one kind's columns.
type Summary struct {
	Pods                                int
	Scheduled, Container, Running, Gone Stats
}

// report prints the tables and writes the JSON: the pods one at a time
// (if any), and the bursts (if any).
func report(samples []Sample, bursts []BurstRound, out string) error {
	results := map[string]any{}
	if len(samples) > 0 {
		sum, ratio := reportOneAtATime(samples)
		results["summary"], results["medianRatioToEmptyDir"], results["samples"] = sum, ratio, samples
	}
	if len(bursts) > 0 {
		printBurst(bursts)
		results["burst"] = map[string]any{"median": mediansOf(bursts), "rounds": bursts}
	}
	b, err := json.MarshalIndent(results, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(out, append(b, '\n'), 0o644)
}

// reportOneAtATime prints the table of the pods started one at a time
// and returns its summary and its ratios to emptyDir.
func reportOneAtATime(samples []Sample) (map[string]*Summary, map[string]map[string]float64) {
	sum := map[string]*Summary{}
	for _, k := range kinds {
		var sched, container, running, gone []float64
		for _, s := range samples {
			if s.Kind == k.name {
				sched, container = append(sched, s.Scheduled), append(container, s.Container)
				running, gone = append(running, s.Running), append(gone, s.Gone)
			}
		}
		sum[k.name] = &Summary{Pods: len(running), Scheduled: stats(sched), Container: stats(container), Running: stats(running), Gone: stats(gone)}
	}
	// ours/emptyDir, of the medians
	ratio := map[string]map[string]float64{"running": {}, "container": {}}
	fmt.Printf("\n%-15s", "ms after the call")
	for _, col := range []string{"create→Running", "create→container", "delete→gone"} {
		fmt.Printf(" %-21s", col)
	}
	fmt.Printf("%s\n%-9s %4s ", "create→bound", "kind", "pods")
	for range 3 {
		fmt.Printf(" %6s %6s %6s ", "median", "p90", "max")
	}
	fmt.Printf("%6s\n", "median")
	for _, k := range kinds {
		s, e := sum[k.name], sum["emptyDir"]
		fmt.Printf("%-9s %4d ", k.name, s.Pods)
		for _, st := range []Stats{s.Running, s.Container, s.Gone} {
			fmt.Printf(" %6.0f %6.0f %6.0f  ", st.Median, st.P90, st.Max)
		}
		fmt.Printf("%6.0f\n", s.Scheduled.Median)
		if k.name != "emptyDir" {
			ratio["running"][k.name] = s.Running.Median / e.Running.Median
			ratio["container"][k.name] = s.Container.Median / e.Container.Median
		}
	}
	for _, col := range []string{"running", "container"} {
		fmt.Printf("ours/emptyDir, median create→%s: static %.2f, postgres %.2f\n", col, ratio[col]["static"], ratio[col]["postgres"])
	}
	for _, s := range samples {
		for _, w := range s.Warnings {
			fmt.Printf("warning, pod %s: %s\n", s.Pod, w)
		}
	}
	return sum, ratio
}
