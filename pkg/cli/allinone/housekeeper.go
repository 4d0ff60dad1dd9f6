package allinone

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os/signal"
	"strings"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/pager"
	"k8s.io/klog/v2"

	"github.com/ephemeral-secrets/csi-driver/pkg/driver"
	"github.com/ephemeral-secrets/csi-driver/pkg/inventory"
)

// housekeeperCmd runs the housekeeper: the inventory's controller without
// a backend (pkg/inventory NewHousekeeper), one always-on pod whatever
// the profile, so that no Credential record, and so no namespace, waits
// for a holder that is gone.
func housekeeperCmd(version string, args []string) error {
	fs := flag.NewFlagSet("housekeeper", flag.ContinueOnError)
	klog.InitFlags(fs)
	var kubeconfig, metricsAddr, issuerLease string
	var opts inventory.ControllerOptions
	fs.StringVar(&kubeconfig, "kubeconfig", "", "kubeconfig for the Kubernetes API; empty: the in-cluster service account")
	fs.StringVar(&metricsAddr, "metrics-address", ":9812", "where /healthz and /readyz are served; empty: nowhere")
	fs.StringVar(&issuerLease, "issuer-lease", "", "namespace/name of the issuer's leader election Lease; empty: no issuer (its records are handed over once deleted)")
	fs.DurationVar(&opts.HandoverAfter, "handover-after", time.Minute, "how long a record being deleted waits for a holder seen gone (the issuer without a leader, the node plugin deregistered)")
	fs.DurationVar(&opts.ExpiryGrace, "expiry-grace", time.Minute, "how long past its expiry a node's record being deleted waits for its node")
	fs.DurationVar(&opts.PodCheckInterval, "pod-check-interval", 5*time.Minute, "how often every record's pod is looked for")
	if err := fs.Parse(args); err != nil {
		return err
	}
	holders := inventory.ClusterHolders{Driver: driver.Name}
	if issuerLease != "" {
		ns, name, ok := strings.Cut(issuerLease, "/")
		if !ok || ns == "" || name == "" {
			return fmt.Errorf("--issuer-lease %q: namespace/name expected", issuerLease)
		}
		holders.IssuerLeaseNamespace, holders.IssuerLeaseName = ns, name
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	cs, ic, err := clusterClients(kubeconfig, "ephemeral-secrets-csi-housekeeper/"+version)
	if err != nil {
		return err
	}
	holders.Client = cs
	inf := inventory.NewInformer(ic, "", 0)
	go inf.Run(ctx.Done())
	if metricsAddr != "" {
		ml, err := net.Listen("tcp", metricsAddr)
		if err != nil {
			return fmt.Errorf("metrics address: %w", err)
		}
		mux := http.NewServeMux()
		mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok\n")) })
		mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
			if !inf.HasSynced() {
				http.Error(w, "credential records not listed yet", http.StatusServiceUnavailable)
				return
			}
			_, _ = w.Write([]byte("ok\n"))
		})
		hs := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		go func() { _ = hs.Serve(ml) }()
		defer hs.Close()
	}
	klog.InfoS("Keeping the inventory of credentials", "issuerLease", issuerLease, "handoverAfter", opts.HandoverAfter)
	return inventory.NewHousekeeper(ic, inf, cs.CoreV1(), holders, opts).Run(ctx, 2)
}

// clusterClients are the API clients of a command run in the cluster (or
// with a kubeconfig).
func clusterClients(kubeconfig, userAgent string) (*kubernetes.Clientset, *inventory.Client, error) {
	rc, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return nil, nil, fmt.Errorf("kubernetes client: %w", err)
	}
	rc.UserAgent = userAgent
	cs, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, nil, err
	}
	ic, err := inventory.NewClient(rc)
	if err != nil {
		return nil, nil, err
	}
	return cs, ic, nil
}

// uninstallCmd is helm uninstall's pre-delete hook: it waits for the pods
// that mount the driver's volumes to go (and fails, naming them, if some
// stay: a pod whose CSI driver is gone never finishes terminating), lets
// the node plugins and the issuer, still running, release their records,
// then hands over every finalizer left.
func uninstallCmd(version string, args []string) error {
	fs := flag.NewFlagSet("uninstall", flag.ContinueOnError)
	klog.InitFlags(fs)
	var kubeconfig, issuerState string
	var waitPods, waitRecords, poll time.Duration
	fs.StringVar(&kubeconfig, "kubeconfig", "", "kubeconfig for the Kubernetes API; empty: the in-cluster service account")
	fs.StringVar(&issuerState, "issuer-state", "", "namespace/name: only delete what the issuer of that name made at run time "+
		"(Secret name-tls, ConfigMap name-ca, Lease name), once the release is gone (helm's post-delete hook)")
	fs.DurationVar(&waitPods, "wait-for-pods", 2*time.Minute, "how long to wait for the pods that mount the driver's volumes to go")
	fs.DurationVar(&waitRecords, "wait-for-records", time.Minute, "how long to wait for the node plugins and the issuer to release their records")
	fs.DurationVar(&poll, "poll-interval", 2*time.Second, "how often pods and records are looked at while waiting")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	cs, ic, err := clusterClients(kubeconfig, "ephemeral-secrets-csi-uninstall/"+version)
	if err != nil {
		return err
	}
	if issuerState != "" {
		return deleteIssuerState(ctx, cs, issuerState)
	}
	start := time.Now()
	var users []string
	err = waitFor(ctx, waitPods, poll, func() (bool, error) {
		users, err = podsUsingDriver(ctx, cs)
		return len(users) == 0, err
	})
	if len(users) > 0 {
		return fmt.Errorf("%d pods still mount volumes of %s: %s. A pod whose CSI driver is gone never finishes terminating "+
			"(kubelet cannot unmount its volume): delete them, or their namespaces, then uninstall again", len(users), driver.Name, strings.Join(users, ", "))
	}
	if err != nil {
		return err
	}
	klog.InfoS("No pod mounts the driver's volumes", "waited", time.Since(start).Round(time.Millisecond))
	held := 0
	_ = waitFor(ctx, waitRecords, poll, func() (bool, error) {
		held, err = inventory.Held(ctx, ic)
		return held == 0, err
	})
	n, err := inventory.HandOverAll(ctx, ic, "the driver is being uninstalled")
	klog.InfoS("Credential records handed over", "records", n, "took", time.Since(start).Round(time.Millisecond))
	return err
}

// deleteIssuerState deletes what the issuer ns/name made at run time,
// which no template of the chart owns; gone already is no error.
func deleteIssuerState(ctx context.Context, cs kubernetes.Interface, nsName string) error {
	ns, name, ok := strings.Cut(nsName, "/")
	if !ok || ns == "" || name == "" {
		return fmt.Errorf("--issuer-state %q: namespace/name expected", nsName)
	}
	var errs []error
	for what, del := range map[string]func() error{
		"Secret " + name + "-tls":   func() error { return cs.CoreV1().Secrets(ns).Delete(ctx, name+"-tls", metav1.DeleteOptions{}) },
		"ConfigMap " + name + "-ca": func() error { return cs.CoreV1().ConfigMaps(ns).Delete(ctx, name+"-ca", metav1.DeleteOptions{}) },
		"Lease " + name:             func() error { return cs.CoordinationV1().Leases(ns).Delete(ctx, name, metav1.DeleteOptions{}) },
	} {
		if err := del(); err != nil && !apierrors.IsNotFound(err) {
			errs = append(errs, fmt.Errorf("deleting %s: %w", what, err))
			continue
		}
		klog.InfoS("Deleted what the issuer made", "object", what, "namespace", ns)
	}
	return errors.Join(errs...)
}

// waitFor polls done every interval until it is true or timeout passes;
// the last error of done is returned when it never was.
func waitFor(ctx context.Context, timeout, interval time.Duration, done func() (bool, error)) error {
	deadline := time.Now().Add(timeout)
	for {
		ok, err := done()
		if ok {
			return nil
		}
		if time.Now().After(deadline) {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(interval):
		}
	}
}

// podsUsingDriver lists (namespace/name) the pods kubelet may still have
// to unmount a volume of the driver for: those not finished.
func podsUsingDriver(ctx context.Context, cs kubernetes.Interface) ([]string, error) {
	var out []string
	err := listPods(ctx, cs, func(p *corev1.Pod) {
		if p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed {
			return
		}
		for _, v := range p.Spec.Volumes {
			if v.CSI != nil && v.CSI.Driver == driver.Name {
				out = append(out, p.Namespace+"/"+p.Name)
				return
			}
		}
	})
	return out, err
}

// listPods pages through every pod of the cluster.
func listPods(ctx context.Context, cs kubernetes.Interface, each func(*corev1.Pod)) error {
	p := pager.New(func(ctx context.Context, opts metav1.ListOptions) (runtime.Object, error) {
		return cs.CoreV1().Pods("").List(ctx, opts)
	})
	err := p.EachListItem(ctx, metav1.ListOptions{}, func(o runtime.Object) error {
		each(o.(*corev1.Pod))
		return nil
	})
	if err != nil {
		return fmt.Errorf("listing pods: %w", err)
	}
	return nil
}
