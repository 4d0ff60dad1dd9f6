// Package node runs a real single-node Kubernetes cluster on this machine,
// for the tests and for a person ("make cluster"): etcd, kube-apiserver,
// kube-controller-manager, kube-scheduler and kube-proxy built from the Go
// module proxy, Debian's containerd and runc, the pods' network on a CNI
// bridge, and kubelet. Every image it runs is built here and imported
// (no registry is reachable).
//
// The node lives in a network and a mount namespace of its own (see
// Command): its addresses, iptables rules, bridge and mounts are invisible
// to the host, and go with the namespace's last process. The program that
// calls Start must run in them.
package node

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/kube"
)

// Name is the node's name.
const Name = "esc-node"

// Tokens of the node's components (bearer tokens of the API server's token
// file; the names are those the default RBAC binds).
const (
	kubeletToken    = "esc-kubelet-token"
	controllerToken = "esc-controller-manager-token"
	schedulerToken  = "esc-scheduler-token"
	proxyToken      = "esc-proxy-token"
)

// Options configure Start.
type Options struct {
	// Work is the node's directory (state, logs); default a new temporary one.
	Work string
	// Images are image archives to import before kubelet starts; one of
	// them must hold PauseImage.
	Images []string
	// PauseImage is containerd's sandbox image.
	PauseImage string
	// Logf reports progress; nil is silent.
	Logf func(format string, args ...any)
}

// Node is a running single-node cluster.
type Node struct {
	*kube.Cluster
	Clients *kubernetes.Clientset
	// Kubeconfig is an admin kubeconfig for the API as seen from inside
	// the namespaces.
	Kubeconfig string
	Work       string
	LogFiles   []string

	opts       Options
	cgroupRoot string
	procs      []*exec.Cmd // started in this order, stopped in the reverse
}

// Start prepares the namespaces and starts the cluster; it returns when
// the node is Ready. Stop undoes all of it.
func Start(ctx context.Context, opts Options) (n *Node, err error) {
	if opts.Logf == nil {
		opts.Logf = func(string, ...any) {}
	}
	if opts.Work == "" {
		if opts.Work, err = os.MkdirTemp("", "esc-node-"); err != nil {
			return nil, err
		}
	}
	n = &Node{Work: opts.Work, opts: opts, cgroupRoot: cgroupRootOf(os.Getpid())}
	defer func() {
		if err != nil {
			n.Stop()
			n = nil
		}
	}()
	if err = prepare(); err != nil {
		return n, err
	}
	if err := os.MkdirAll(filepath.Join(opts.Work, "logs"), 0o755); err != nil {
		return n, err
	}
	opts.Logf("starting etcd and kube-apiserver")
	n.Cluster, err = kube.StartWith(kube.Options{
		BindAddress: "0.0.0.0", AdvertiseAddress: NodeIP,
		ExtraIPs: []net.IP{net.ParseIP(NodeIP), net.ParseIP("10.96.0.1")},
		Nodes:    true,
		Users: []kube.User{
			{Token: kubeletToken, Name: "system:node:" + Name, Groups: []string{"system:nodes"}},
			{Token: controllerToken, Name: "system:kube-controller-manager"},
			{Token: schedulerToken, Name: "system:kube-scheduler"},
			{Token: proxyToken, Name: "system:kube-proxy"},
		},
	})
	if err != nil {
		return n, err
	}
	n.LogFiles = append(n.LogFiles, n.Cluster.LogFiles...)
	if n.Clients, err = kubernetes.NewForConfig(n.Config()); err != nil {
		return n, err
	}
	n.Kubeconfig = filepath.Join(opts.Work, "admin.kubeconfig")
	if err := n.Cluster.Kubeconfig(n.Kubeconfig, "", kube.AdminToken); err != nil {
		return n, err
	}
	for _, step := range []struct {
		what string
		run  func(context.Context) error
	}{
		{"kube-controller-manager and kube-scheduler", n.startControlPlane},
		{"containerd", n.startContainerd},
		{"image imports", n.importImages},
		{"kubelet", n.startKubelet},
		{"kube-proxy", n.startProxy},
		{"the node to be Ready", n.waitReady},
	} {
		opts.Logf("node: %s", step.what)
		if err := step.run(ctx); err != nil {
			return n, fmt.Errorf("%s: %w", step.what, err)
		}
	}
	return n, nil
}

// kubeconfig writes a kubeconfig for one of the node's identities.
func (n *Node) kubeconfig(name, token string) (string, error) {
	path := filepath.Join(n.Work, name+".kubeconfig")
	return path, n.Cluster.Kubeconfig(path, "", token)
}

// start runs a component with its log in the node's log directory.
func (n *Node) start(name string, args ...string) error {
	bin := args[0]
	if !strings.HasPrefix(bin, "/") {
		p, err := harness.Tool(bin)
		if err != nil {
			if p, err = exec.LookPath(bin); err != nil {
				return fmt.Errorf("%s not found (make kube; apt-get install containerd runc containernetworking-plugins iptables)", bin)
			}
		}
		bin = p
	}
	logPath := filepath.Join(n.Work, "logs", name+".log")
	log, err := os.Create(logPath)
	if err != nil {
		return err
	}
	cmd := exec.Command(bin, args[1:]...)
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		log.Close()
		return err
	}
	log.Close()
	n.LogFiles = append(n.LogFiles, logPath)
	n.procs = append(n.procs, cmd)
	return nil
}

func (n *Node) startControlPlane(context.Context) error {
	kcm, err := n.kubeconfig("controller-manager", controllerToken)
	if err != nil {
		return err
	}
	sched, err := n.kubeconfig("scheduler", schedulerToken)
	if err != nil {
		return err
	}
	ca := filepath.Join(n.Work, "ca.crt")
	if err := os.WriteFile(ca, n.CAPEM, 0o644); err != nil {
		return err
	}
	ports, err := harness.FreePorts(2)
	if err != nil {
		return err
	}
	if err := n.start("kube-controller-manager", "kube-controller-manager",
		"--kubeconfig", kcm, "--authentication-kubeconfig", kcm, "--authorization-kubeconfig", kcm,
		"--leader-elect=false", "--use-service-account-credentials=true", // each controller with its own role, as kubeadm runs it
		"--service-account-private-key-file", n.SAKeyFile(), "--root-ca-file", ca,
		"--bind-address", "127.0.0.1", fmt.Sprintf("--secure-port=%d", ports[0]),
		// No pod CIDRs to allocate (the CNI bridge's host-local IPAM does it).
		// 1.37 has no cloud controllers in kube-controller-manager any
		// more: naming one is an error.
		"--controllers", "*,-nodeipam",
		"--v", "1"); err != nil {
		return err
	}
	return n.start("kube-scheduler", "kube-scheduler",
		"--kubeconfig", sched, "--authentication-kubeconfig", sched, "--authorization-kubeconfig", sched,
		"--leader-elect=false", "--bind-address", "127.0.0.1", fmt.Sprintf("--secure-port=%d", ports[1]), "--v", "1")
}

// containerd's CRI settings for this machine: cgroupfs (no systemd here),
// and restrict_oom_score_adj because the VM withholds CAP_SYS_RESOURCE
// (runc then fails to give the sandbox its negative oom_score_adj).
const containerdConfig = `version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "%s"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "/etc/cni/net.d"
`

// The pods' network: a bridge (the node's address is its gateway), no
// masquerade: the node's namespace has no way out, and none is wanted.
const cniConfig = `{
  "cniVersion": "1.0.0",
  "name": "esc",
  "plugins": [{
    "type": "bridge",
    "bridge": "` + Bridge + `",
    "isGateway": true,
    "ipMasq": false,
    "hairpinMode": true,
    "ipam": {"type": "host-local", "ranges": [[{"subnet": "` + PodSubnet + `", "gateway": "` + NodeIP + `"}]], "routes": [{"dst": "0.0.0.0/0"}]}
  }]
}
`

// ContainerdSocket is containerd's socket in the node's mount namespace.
const ContainerdSocket = "/run/containerd/containerd.sock"

func (n *Node) startContainerd(ctx context.Context) error {
	cfg := filepath.Join(n.Work, "containerd.toml")
	if err := os.WriteFile(cfg, fmt.Appendf(nil, containerdConfig, n.opts.PauseImage), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile("/etc/cni/net.d/10-esc.conflist", []byte(cniConfig), 0o644); err != nil {
		return err
	}
	if err := n.start("containerd", "containerd", "--config", cfg, "--log-level", "warn"); err != nil {
		return err
	}
	return poll(ctx, 30*time.Second, func() error {
		return exec.Command("ctr", "--address", ContainerdSocket, "version").Run()
	})
}

// Ctr runs ctr against the node's containerd, in kubelet's namespace.
func Ctr(args ...string) ([]byte, error) {
	cmd := exec.Command("ctr", append([]string{"--address", ContainerdSocket, "-n", "k8s.io"}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("ctr %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return out, nil
}

func (n *Node) importImages(context.Context) error {
	for _, img := range n.opts.Images {
		if _, err := Ctr("images", "import", img); err != nil {
			return err
		}
	}
	return nil
}

// kubelet's settings for this machine: cgroup v1 with the cgroupfs
// driver under a cgroup root of the node's own (removed at Stop), and
// eviction thresholds that a shared disk cannot trip.
const kubeletConfig = `apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: %s
containerRuntimeEndpoint: unix://` + ContainerdSocket + `
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: %s}
authorization: {mode: Webhook}
failSwapOn: false
port: %d
healthzPort: %d
healthzBindAddress: 127.0.0.1
readOnlyPort: 0
evictionHard: {memory.available: "1Mi", nodefs.available: "1%%", nodefs.inodesFree: "1%%", imagefs.available: "1%%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
syncFrequency: 10s
fileCheckFrequency: 5s
`

func (n *Node) startKubelet(context.Context) error {
	kc, err := n.kubeconfig("kubelet", kubeletToken)
	if err != nil {
		return err
	}
	if err := makeCgroupRoot(n.cgroupRoot); err != nil {
		return err
	}
	ports, err := harness.FreePorts(2)
	if err != nil {
		return err
	}
	cfg := filepath.Join(n.Work, "kubelet.yaml")
	body := fmt.Sprintf(kubeletConfig, n.cgroupRoot, filepath.Join(n.Work, "ca.crt"), ports[0], ports[1])
	if err := os.WriteFile(cfg, []byte(body), 0o644); err != nil {
		return err
	}
	return n.start("kubelet", "kubelet", "--config", cfg, "--kubeconfig", kc,
		"--hostname-override", Name, "--node-ip", NodeIP, "--v", "2")
}

const proxyConfig = `apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clusterCIDR: ` + PodSubnet + `
hostnameOverride: ` + Name + `
clientConnection: {kubeconfig: %s}
metricsBindAddress: 127.0.0.1:%d
healthzBindAddress: 127.0.0.1:%d
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
`

func (n *Node) startProxy(context.Context) error {
	kc, err := n.kubeconfig("kube-proxy", proxyToken)
	if err != nil {
		return err
	}
	ports, err := harness.FreePorts(2)
	if err != nil {
		return err
	}
	cfg := filepath.Join(n.Work, "kube-proxy.yaml")
	if err := os.WriteFile(cfg, fmt.Appendf(nil, proxyConfig, kc, ports[0], ports[1]), 0o644); err != nil {
		return err
	}
	return n.start("kube-proxy", "kube-proxy", "--config", cfg, "--v", "1")
}

func (n *Node) waitReady(ctx context.Context) error {
	return poll(ctx, 3*time.Minute, func() error {
		node, err := n.Clients.CoreV1().Nodes().Get(ctx, Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		for _, c := range node.Status.Conditions {
			if c.Type == corev1.NodeReady {
				if c.Status == corev1.ConditionTrue {
					return nil
				}
				return fmt.Errorf("node not ready: %s", c.Message)
			}
		}
		return errors.New("node has no Ready condition yet")
	})
}

// Stop stops everything Start started, kills every process left in the
// node's network namespace (containers, shims), unmounts what kubelet
// mounted, and removes the node's cgroups.
func (n *Node) Stop() {
	for i := len(n.procs) - 1; i >= 0; i-- {
		stopProcess(n.procs[i], 10*time.Second)
	}
	killNamespace()
	if n.Cluster != nil {
		n.Cluster.Stop()
	}
	for _, dir := range hostDirs {
		harness.UnmountUnder(dir + "/")
	}
	removeCgroupRoot(n.cgroupRoot)
}

func stopProcess(cmd *exec.Cmd, grace time.Duration) {
	if cmd.Process == nil {
		return
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(grace):
		_ = cmd.Process.Kill()
		<-done
	}
}

// poll calls f until it succeeds or timeout passes, and returns its last error.
func poll(ctx context.Context, timeout time.Duration, f func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := f()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// RestConfig is an admin client configuration.
func (n *Node) RestConfig() *rest.Config { return n.Config() }

// DeleteWorkloads deletes every pod but the driver's and waits (up to
// timeout) until they are gone: kubelet unpublishes their volumes and the
// driver revokes their credentials before the node stops.
func (n *Node) DeleteWorkloads(ctx context.Context, timeout time.Duration) {
	nss, err := n.Clients.CoreV1().Namespaces().List(ctx, metav1.ListOptions{})
	if err != nil {
		return
	}
	for _, ns := range nss.Items {
		if ns.Name != Namespace {
			_ = n.Clients.CoreV1().Pods(ns.Name).DeleteCollection(ctx, metav1.DeleteOptions{}, metav1.ListOptions{})
		}
	}
	_ = poll(ctx, timeout, func() error {
		pods, err := n.Clients.CoreV1().Pods("").List(ctx, metav1.ListOptions{})
		if err != nil {
			return err
		}
		for _, p := range pods.Items {
			if p.Namespace != Namespace {
				return fmt.Errorf("pod %s/%s still there", p.Namespace, p.Name)
			}
		}
		return nil
	})
}

// Describe summarises the cluster for a person reading a failure: each
// pod's phase and container states, and the Warning events.
func (n *Node) Describe(ctx context.Context) string {
	var b strings.Builder
	pods, err := n.Clients.CoreV1().Pods("").List(ctx, metav1.ListOptions{})
	if err != nil {
		return err.Error()
	}
	for _, p := range pods.Items {
		fmt.Fprintf(&b, "pod %s/%s: %s %s\n", p.Namespace, p.Name, p.Status.Phase, p.Status.Message)
		for _, cs := range p.Status.ContainerStatuses {
			fmt.Fprintf(&b, "  container %s: ready=%v restarts=%d state=%+v last=%+v\n", cs.Name, cs.Ready, cs.RestartCount, cs.State, cs.LastTerminationState)
			tail := int64(40)
			for _, previous := range []bool{true, false} {
				logs, err := n.Clients.CoreV1().Pods(p.Namespace).GetLogs(p.Name, &corev1.PodLogOptions{Container: cs.Name, Previous: previous, TailLines: &tail}).DoRaw(ctx)
				if err == nil && len(logs) > 0 {
					fmt.Fprintf(&b, "  --- log (previous=%v) ---\n%s\n", previous, logs)
				}
			}
		}
	}
	evs, err := n.Clients.CoreV1().Events("").List(ctx, metav1.ListOptions{FieldSelector: "type=Warning"})
	if err == nil {
		for _, e := range evs.Items {
			fmt.Fprintf(&b, "event %s %s/%s %s: %s\n", e.Source.Component, e.InvolvedObject.Namespace, e.InvolvedObject.Name, e.Reason, e.Message)
		}
	}
	return b.String()
}
