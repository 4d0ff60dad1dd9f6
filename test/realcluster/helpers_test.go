package realcluster

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ephemeral-secrets/csi-driver/pkg/audit"
	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/node"
)

// applyExample applies the YAML files of an example directory in the
// order kubectl apply -f DIR reads them, with the example's published
// images replaced by the ones built here: the only change made.
func applyExample(t *testing.T, dir string) {
	t.Helper()
	applyExampleWith(t, dir, strings.NewReplacer())
}

// waitPod waits until the pod's phase is one of phases and returns it.
func waitPod(t *testing.T, ns, name string, timeout time.Duration, phases ...corev1.PodPhase) *corev1.Pod {
	t.Helper()
	var pod *corev1.Pod
	harness.Eventually(t, timeout, fmt.Sprintf("pod %s/%s in %v", ns, name, phases), func() (bool, error) {
		p, err := cluster.Clients.CoreV1().Pods(ns).Get(context.Background(), name, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		pod = p
		for _, ph := range phases {
			if p.Status.Phase == ph {
				return true, nil
			}
		}
		return false, fmt.Errorf("phase %s", p.Status.Phase)
	})
	return pod
}

// podLogs returns a container's log through the API server and kubelet.
func podLogs(t *testing.T, ns, name, container string) string {
	t.Helper()
	b, err := cluster.Clients.CoreV1().Pods(ns).GetLogs(name, &corev1.PodLogOptions{Container: container}).DoRaw(context.Background())
	if err != nil {
		t.Fatalf("logs of %s/%s: %v", ns, name, err)
	}
	return string(b)
}

// waitLog waits until a container's log matches re.
func waitLog(t *testing.T, ns, name, container string, timeout time.Duration, re string) string {
	t.Helper()
	rx := regexp.MustCompile(re)
	var match string
	harness.Eventually(t, timeout, fmt.Sprintf("%s/%s log matching %q", ns, name, re), func() (bool, error) {
		b, err := cluster.Clients.CoreV1().Pods(ns).GetLogs(name, &corev1.PodLogOptions{Container: container}).DoRaw(context.Background())
		if err != nil {
			return false, err
		}
		match = rx.FindString(string(b))
		return match != "", nil
	})
	return match
}

// driverPod is the running driver pod of the node.
func driverPod(t *testing.T) *corev1.Pod {
	t.Helper()
	var pod *corev1.Pod
	harness.Eventually(t, 2*time.Minute, "a running driver pod", func() (bool, error) {
		// The node plugin's, not the issuer's (whose names share the prefix).
		pods, err := cluster.Clients.CoreV1().Pods(node.Namespace).List(context.Background(),
			metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=node"})
		if err != nil {
			return false, err
		}
		for i := range pods.Items {
			p := &pods.Items[i]
			if p.DeletionTimestamp == nil && p.Status.Phase == corev1.PodRunning && strings.HasPrefix(p.Name, "ephemeral-secrets-csi-") {
				pod = p
				return true, nil
			}
		}
		return false, nil
	})
	return pod
}

// auditRecords reads the audit records the driver pod has written so far
// (the driver writes them to stdout), and keeps its log for the secret
// search at the end.
func auditRecords(t *testing.T, pod *corev1.Pod) []audit.Record {
	t.Helper()
	logs := podLogs(t, pod.Namespace, pod.Name, "driver")
	keepLog(pod.Name, logs)
	var out []audit.Record
	sc := bufio.NewScanner(strings.NewReader(logs))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, "{") {
			continue
		}
		var r audit.Record
		if json.Unmarshal([]byte(line), &r) == nil && r.Stage != "" {
			out = append(out, r)
		}
	}
	return out
}

// keepLog writes a log to the harness's log directory, where the final
// check searches it for every credential the suite saw.
func keepLog(name, content string) {
	path := filepath.Join(harness.LogDir(), "realcluster-"+name+".log")
	_ = os.WriteFile(path, []byte(content), 0o600)
	harness.RegisterLog(path)
}

// recordsOf filters the records of one pod and stage.
func recordsOf(rs []audit.Record, podName string, stage audit.Stage) []audit.Record {
	var out []audit.Record
	for _, r := range rs {
		if r.Pod.Name == podName && r.Stage == stage {
			out = append(out, r)
		}
	}
	return out
}

// volumeFile reads a file of a pod's CSI volume on the node, as kubelet
// mounted it (the test runs in the node's mount namespace).
func volumeFile(t *testing.T, pod *corev1.Pod, volume, file string) string {
	t.Helper()
	p := filepath.Join("/var/lib/kubelet/pods", string(pod.UID), "volumes/kubernetes.io~csi", volume, "mount", file)
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatalf("reading the pod's volume: %v", err)
	}
	return string(b)
}

// deletePod deletes a pod and waits until it is gone.
func deletePod(t *testing.T, ns, name string) {
	t.Helper()
	ctx := context.Background()
	if err := cluster.Clients.CoreV1().Pods(ns).Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	harness.Eventually(t, 2*time.Minute, "pod "+name+" gone", func() (bool, error) {
		_, err := cluster.Clients.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
		return err != nil, nil
	})
}

// roleGone waits until a role is dropped and returns when it saw it gone.
func roleGone(t *testing.T, role string, timeout time.Duration) time.Time {
	t.Helper()
	var at time.Time
	harness.Eventually(t, timeout, "role "+role+" dropped", func() (bool, error) {
		ok, err := db.RoleExists(context.Background(), role)
		if err != nil {
			return false, err
		}
		at = time.Now()
		return !ok, nil
	})
	return at
}

// events lists the Warning events of a pod, as kubectl describe shows them.
func warnings(t *testing.T, ns, name string) []corev1.Event {
	t.Helper()
	evs, err := cluster.Clients.CoreV1().Events(ns).List(context.Background(), metav1.ListOptions{
		FieldSelector: "involvedObject.name=" + name,
	})
	if err != nil {
		t.Fatal(err)
	}
	var out []corev1.Event
	for _, e := range evs.Items {
		if e.Type == corev1.EventTypeWarning {
			out = append(out, e)
		}
	}
	return out
}

// followLogs streams a container's log until it ends (the pod goes) and
// returns a function that waits for the end and gives the whole log.
func followLogs(t *testing.T, pod *corev1.Pod, container string) func() string {
	t.Helper()
	rc, err := cluster.Clients.CoreV1().Pods(pod.Namespace).GetLogs(pod.Name, &corev1.PodLogOptions{Container: container, Follow: true}).Stream(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan string, 1)
	go func() {
		defer rc.Close()
		b, _ := io.ReadAll(rc)
		keepLog(pod.Name+"-followed", string(b))
		done <- string(b)
	}()
	return func() string {
		select {
		case s := <-done:
			return s
		case <-time.After(time.Minute):
			t.Fatal("the log stream did not end")
			return ""
		}
	}
}
