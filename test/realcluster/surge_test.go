package realcluster

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/ephemeral-secrets/csi-driver/pkg/audit"
	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/node"
)

// nodePlugins lists the DaemonSet's pods that are not being deleted.
func nodePlugins(t *testing.T) []corev1.Pod {
	t.Helper()
	pods, err := cluster.Clients.CoreV1().Pods(node.Namespace).List(context.Background(),
		metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=node"})
	if err != nil {
		t.Fatal(err)
	}
	var out []corev1.Pod
	for _, p := range pods.Items {
		if p.DeletionTimestamp == nil && strings.HasPrefix(p.Name, "ephemeral-secrets-csi-") {
			out = append(out, p)
		}
	}
	return out
}

// testSurgeRollout: the DaemonSet rolled with maxSurge 1 and
// maxUnavailable 0 while a pod's volume is live. The new driver pod waits
// for the node lock beside the old one, is ready while the old serves (or
// the rollout would never delete the old pod), and takes the node over
// when the old pod goes: kubelet registers it, the running pod's
// credential keeps rotating, and deleting the pod revokes through it.
func testSurgeRollout(t *testing.T) {
	ctx := context.Background()
	startRotatingPod(t, "surging")
	waitLog(t, rotatingNS, "surging", "agent", time.Minute, rotatingUser.String())
	// An earlier step's rollout may still be going on, and the DaemonSet
	// controller deletes an old pod that is not available at once, with no
	// surge (seen: the surge pod then never waited): start from one driver
	// pod, of the current template, ready.
	harness.Eventually(t, 2*time.Minute, "one ready driver pod of the current template", func() (bool, error) {
		ds, err := cluster.Clients.AppsV1().DaemonSets(node.Namespace).Get(ctx, "ephemeral-secrets-csi", metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		st := ds.Status
		if st.ObservedGeneration != ds.Generation || st.UpdatedNumberScheduled != st.DesiredNumberScheduled ||
			st.NumberAvailable != st.DesiredNumberScheduled {
			return false, nil
		}
		pods := nodePlugins(t)
		if len(pods) != 1 {
			return false, fmt.Errorf("%d driver pods", len(pods))
		}
		for _, c := range pods[0].Status.Conditions {
			if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
				return true, nil
			}
		}
		return false, nil
	})
	old := driverPod(t)
	auditRecords(t, old) // keep its log for the secret search
	seenBefore := usersIn(podLogs(t, rotatingNS, "surging", "agent"))

	dss := cluster.Clients.AppsV1().DaemonSets(node.Namespace)
	ds, err := dss.Get(ctx, "ephemeral-secrets-csi", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	strategy := ds.Spec.UpdateStrategy.DeepCopy()
	t.Cleanup(func() { // back to the chart's strategy for the steps after
		d, err := dss.Get(context.Background(), "ephemeral-secrets-csi", metav1.GetOptions{})
		if err == nil {
			d.Spec.UpdateStrategy = *strategy
			_, err = dss.Update(context.Background(), d, metav1.UpdateOptions{})
		}
		if err != nil {
			t.Errorf("restoring the update strategy: %v", err)
		}
	})
	patch := fmt.Sprintf(`{"spec":{"updateStrategy":{"type":"RollingUpdate","rollingUpdate":{"maxSurge":1,"maxUnavailable":0}},`+
		`"template":{"metadata":{"annotations":{"esc-test/rollout":"%d"}}}}}`, time.Now().UnixNano())
	start := time.Now()
	if _, err := dss.Patch(ctx, "ephemeral-secrets-csi", types.StrategicMergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	// The surge: a second driver pod on the node, waiting for the lock.
	var fresh *corev1.Pod
	harness.Eventually(t, 2*time.Minute, "the surge pod waiting for the node lock", func() (bool, error) {
		for _, p := range nodePlugins(t) {
			if p.UID == old.UID || p.Status.Phase != corev1.PodRunning {
				continue
			}
			b, err := cluster.Clients.CoreV1().Pods(node.Namespace).GetLogs(p.Name, &corev1.PodLogOptions{Container: "driver"}).DoRaw(ctx)
			if err != nil {
				return false, err
			}
			if strings.Contains(string(b), "Waiting for the node lock") {
				fresh = &p
				return true, nil
			}
		}
		return false, nil
	})
	// The rollout goes on only because the waiting pod is ready: the old
	// pod is deleted, the new one takes over and kubelet registers it.
	harness.Eventually(t, 3*time.Minute, "the rollout done: one driver pod, the new one, ready", func() (bool, error) {
		pods := nodePlugins(t)
		if len(pods) != 1 || pods[0].UID != fresh.UID {
			return false, fmt.Errorf("%d driver pods", len(pods))
		}
		for _, c := range pods[0].Status.Conditions {
			if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
				return true, nil
			}
		}
		return false, nil
	})
	// The CSINode lists the driver from the old pod's registration: the
	// new instance's own registration is kubelet's answer to it.
	harness.Eventually(t, time.Minute, "kubelet registering the new driver", func() (bool, error) {
		logs := podLogs(t, node.Namespace, fresh.Name, "driver")
		for _, want := range []string{"Waiting for the node lock", "Holding the node lock", "Resumed volume", "Kubelet registered the driver"} {
			if !strings.Contains(logs, want) {
				return false, fmt.Errorf("the new driver's log lacks %q", want)
			}
		}
		return true, nil
	})
	if err := cluster.WaitDriverRegistered(ctx); err != nil {
		t.Fatal(err)
	}
	report(t, "surge rollout, patch -> new driver pod holding the node and registered", time.Since(start))

	// The running pod's credential, published by the old driver, keeps
	// rotating under the new one, and the pod never restarted.
	harness.Eventually(t, 90*time.Second, "the running pod logging in with a credential rotated after the rollout", func() (bool, error) {
		for u := range usersIn(podLogs(t, rotatingNS, "surging", "agent")) {
			if !seenBefore[u] {
				return true, nil
			}
		}
		return false, nil
	})
	p, err := cluster.Clients.CoreV1().Pods(rotatingNS).Get(ctx, "surging", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if cs := p.Status.ContainerStatuses; len(cs) != 1 || cs[0].RestartCount != 0 {
		t.Fatalf("the running pod restarted: %+v", cs)
	}
	users := usersIn(podLogs(t, rotatingNS, "surging", "agent"))
	rs := auditRecords(t, fresh)
	if n := len(recordsOf(rs, "surging", audit.Rotate)) + len(recordsOf(rs, "surging", audit.Renew)); n == 0 {
		t.Fatal("the new driver neither renewed nor rotated the running pod's lease")
	}
	if n := len(recordsOf(rs, "surging", audit.Issue)); n != 0 {
		t.Fatalf("the new driver issued %d leases for the running pod: the handover must resume, not re-issue", n)
	}
	// Deleting the pod: the new driver unpublishes and revokes.
	deletePod(t, rotatingNS, "surging")
	for u := range users {
		roleGone(t, u, 2*time.Minute)
	}
	revoked := false
	for _, r := range recordsOf(auditRecords(t, fresh), "surging", audit.Revoke) {
		revoked = revoked || r.Outcome == audit.Success
	}
	if !revoked {
		t.Fatal("no successful revoke record of the new driver for the deleted pod")
	}
}
