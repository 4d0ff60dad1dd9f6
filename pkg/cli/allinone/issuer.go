package allinone

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime/debug"
	"strings"
	"syscall"
	"time"

	"golang.org/x/time/rate"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	corev1client "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"

	"github.com/ephemeral-secrets/csi-driver/pkg/audit"
	"github.com/ephemeral-secrets/csi-driver/pkg/cli"
	"github.com/ephemeral-secrets/csi-driver/pkg/credential"
	"github.com/ephemeral-secrets/csi-driver/pkg/events"
	"github.com/ephemeral-secrets/csi-driver/pkg/inventory"
	"github.com/ephemeral-secrets/csi-driver/pkg/issuer"
	pgengine "github.com/ephemeral-secrets/csi-driver/pkg/issuer/postgres"
	"github.com/ephemeral-secrets/csi-driver/pkg/issuer/remote"
	"github.com/ephemeral-secrets/csi-driver/pkg/issuer/use"
	"github.com/ephemeral-secrets/csi-driver/pkg/metrics"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider/postgres"
)

type issuerFlags struct {
	listen, metricsAddr, kubeconfig, namespace, backends, auditLog  string
	tlsSecret, caConfigMap, service, clusterDomain, dnsNames        string
	audience, driverNamespace, driverServiceAccount, leaseName, id  string
	reap, requestTimeout, reviewCache, leaseDuration, renewDeadline time.Duration
	useInterval                                                     time.Duration
	retryPeriod, certValidity, retryMax                             time.Duration
	qps                                                             float64
	burst                                                           int
	podCache                                                        bool
}

// issuerCmd runs the cluster issuer: the only holder of the database's
// admin credential. Every replica serves node plugins over HTTPS (each
// decision reads the database and the API afresh, so replicas need not
// agree on anything); the leader alone reaps expired roles, observes the
// credentials' use and runs the inventory's controller.
func issuerCmd(version string, args []string) error {
	fs := flag.NewFlagSet("issuer", flag.ContinueOnError)
	klog.InitFlags(fs)
	host, _ := os.Hostname()
	var f issuerFlags
	fs.StringVar(&f.listen, "listen-address", ":8443", "where node plugins' HTTPS requests are served")
	fs.StringVar(&f.metricsAddr, "metrics-address", ":9811", "where /metrics, /healthz and /readyz are served; empty: nowhere")
	fs.StringVar(&f.kubeconfig, "kubeconfig", "", "kubeconfig for the Kubernetes API; empty: the in-cluster service account")
	fs.StringVar(&f.namespace, "namespace", os.Getenv("POD_NAMESPACE"), "the issuer's namespace: its TLS Secret, CA ConfigMap and leader Lease live there (default $POD_NAMESPACE, else the service account's)")
	fs.StringVar(&f.backends, "backend-config", "", "YAML file with the postgres section of the backend configuration (admin credentials; mount it from a Secret)")
	fs.StringVar(&f.auditLog, "audit-log", "-", "where audit records go: - for stdout, or a file path")
	fs.StringVar(&f.tlsSecret, "tls-secret", "ephemeral-secrets-csi-issuer-tls", "Secret holding the issuer's signer and serving certificate (made if missing)")
	fs.StringVar(&f.caConfigMap, "ca-configmap", "ephemeral-secrets-csi-issuer-ca", "ConfigMap where the signer's certificate is published for node plugins (ca.crt)")
	fs.StringVar(&f.service, "service-name", "ephemeral-secrets-csi-issuer", "the issuer's Service: its DNS names are in the serving certificate")
	fs.StringVar(&f.clusterDomain, "cluster-domain", "cluster.local", "the cluster's DNS domain")
	fs.StringVar(&f.dnsNames, "tls-dns-names", "", "more DNS names for the serving certificate, comma-separated")
	fs.DurationVar(&f.certValidity, "tls-validity", 90*24*time.Hour, "validity of a serving certificate; renewed with a third left")
	fs.StringVar(&f.audience, "audience", remote.Audience, "audience node plugins' tokens must have")
	fs.StringVar(&f.driverNamespace, "driver-namespace", "", "namespace of the driver's DaemonSet (default: the issuer's)")
	fs.StringVar(&f.driverServiceAccount, "driver-service-account", "ephemeral-secrets-csi", "service account of the driver's DaemonSet: the only caller allowed")
	fs.DurationVar(&f.reviewCache, "token-review-cache", 10*time.Second, "how long a TokenReview's answer is reused")
	fs.DurationVar(&f.reap, "reap-interval", issuer.DefaultReapInterval, "how often the leader drops expired and unrecorded roles")
	fs.DurationVar(&f.useInterval, "use-interval", use.DefaultInterval, "how often the leader samples the sessions of the postgres roles it made (one query per connection): each credential's use, and a use from an address not its pod's, its node's or the connection's expectedSources; at least 100ms; 0: use is not observed")
	fs.DurationVar(&f.requestTimeout, "request-timeout", 30*time.Second, "bound on one request's work")
	fs.DurationVar(&f.retryMax, "retry-max", time.Minute, "longest wait between two attempts of a failed revocation of a deleted Credential's credential (the leader's inventory controller)")
	fs.StringVar(&f.leaseName, "leader-election-lease", "ephemeral-secrets-csi-issuer", "coordination.k8s.io Lease the replicas elect a leader with")
	fs.StringVar(&f.id, "leader-election-identity", host, "this replica's identity in the Lease")
	fs.DurationVar(&f.leaseDuration, "leader-election-lease-duration", 15*time.Second, "how long a leader's Lease holds without renewal")
	fs.DurationVar(&f.renewDeadline, "leader-election-renew-deadline", 10*time.Second, "how long a leader tries to renew before it gives up leading")
	fs.DurationVar(&f.retryPeriod, "leader-election-retry-period", 2*time.Second, "how often replicas try to acquire or renew the Lease")
	fs.Float64Var(&f.qps, "kube-api-qps", 500, "requests per second to the Kubernetes API, of each of the issuer's two clients (core: a mint reads a pod its cache does not hold, a new token is reviewed, the pod cache watches; inventory: a mint creates its record, its status is written later); the API server's priority and fairness protects it")
	fs.IntVar(&f.burst, "kube-api-burst", 1000, "bursts allowed above --kube-api-qps")
	fs.BoolVar(&f.podCache, "pod-cache", true, "check a mint's pod in a cache of the cluster's running pods (a watch; each pod trimmed to what the check reads) before asking the API server, which answers whatever the cache does not accept; false: a GET of the pod on every mint and extension (needs no list or watch of pods)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if f.useInterval != 0 && f.useInterval < use.MinInterval {
		return fmt.Errorf("--use-interval is at least %s (0: use is not observed)", use.MinInterval)
	}
	cfg, err := readIssuerConfig(f.backends)
	if err != nil {
		return err
	}
	if f.namespace == "" {
		ns, err := os.ReadFile("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
		if err != nil {
			return errors.New("no namespace: give --namespace or set POD_NAMESPACE")
		}
		f.namespace = strings.TrimSpace(string(ns))
	}
	if f.driverNamespace == "" {
		f.driverNamespace = f.namespace
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	rc, err := clientcmd.BuildConfigFromFlags("", f.kubeconfig)
	if err != nil {
		return fmt.Errorf("kubernetes client: %w", err)
	}
	rc.UserAgent = "ephemeral-secrets-csi-issuer/" + version
	// client-go's default (5 per second) would hold a burst of publishes
	// for minutes: each may need a GET of its pod (a pod the cache does
	// not hold yet), and its record two requests more (the inventory's
	// client, made from this configuration, has a limiter of its own).
	// 500 mints at once over two replicas fit in the default burst.
	rc.QPS, rc.Burst = float32(f.qps), f.burst
	cs, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return err
	}
	auditOut, closeAudit, err := cli.OpenAudit(f.auditLog)
	if err != nil {
		return err
	}
	defer closeAudit()

	plugins, err := issuerPlugins(ctx, rc, cs.CoreV1(), f.retryMax, f.id)
	if err != nil {
		return err
	}
	m := metrics.NewIssuer(metrics.IssuerOptions{Revoking: plugins.Revoking})
	podCheck := issuer.APIPodCheck(cs.CoreV1())
	if f.podCache {
		// Not waited for: until it has synced, every check asks the API
		// server.
		// Protobuf: the first list of every running pod is the cache's
		// peak of memory, and protobuf is a third of the JSON.
		pc := rest.CopyConfig(rc)
		pc.ContentType = "application/vnd.kubernetes.protobuf"
		pcs, err := kubernetes.NewForConfig(pc)
		if err != nil {
			return err
		}
		pods := issuer.NewPodCache(pcs.CoreV1())
		go pods.Run(ctx)
		go func() {
			// The first list of every running pod is a peak (some
			// kilobytes a pod) of which the cache keeps a few hundred
			// bytes a pod: the rest goes back to the system now, not at
			// the runtime's next forced collection.
			if cache.WaitForCacheSync(ctx.Done(), pods.HasSynced) {
				debug.FreeOSMemory()
			}
		}()
		podCheck = issuer.CachedPodCheck(pods, cs.CoreV1())
	}
	iss, err := issuer.New(issuer.Options{
		Config: cfg, PodCheck: podCheck, Inventory: plugins.Inventory,
		ReapInterval: f.reap, Audit: audit.New(auditOut), OnReap: countReaps(m),
		Use: issuer.UseOptions{Interval: f.useInterval, Meter: m.Use(),
			Resolver: use.KubeResolver{Pods: cs.CoreV1(), Nodes: cs.CoreV1()}},
	})
	if err != nil {
		return err
	}
	defer iss.Close()

	svc := f.service + "." + f.namespace
	names := []string{svc + ".svc", svc + ".svc." + f.clusterDomain, svc, f.service}
	for n := range strings.SplitSeq(f.dnsNames, ",") {
		if n = strings.TrimSpace(n); n != "" {
			names = append(names, n)
		}
	}
	certs, err := remote.NewCerts(cs, remote.CertOptions{Namespace: f.namespace, Secret: f.tlsSecret, ConfigMap: f.caConfigMap,
		DNSNames: names, Validity: f.certValidity})
	if err != nil {
		return err
	}
	if err := certs.Run(ctx, 10*time.Minute); err != nil {
		return err
	}
	reviewer, err := remote.NewTokenReviewer(cs.AuthenticationV1().TokenReviews(), remote.ReviewOptions{
		Audience: f.audience, Namespace: f.driverNamespace, ServiceAccount: f.driverServiceAccount, CacheTTL: f.reviewCache})
	if err != nil {
		return err
	}
	srv := remote.NewServer(remote.ServerOptions{Authority: iss, Authenticator: reviewer, Timeout: f.requestTimeout, Observe: m.Request})
	l, err := net.Listen("tcp", f.listen)
	if err != nil {
		return fmt.Errorf("listen address: %w", err)
	}
	klog.InfoS("Serving node plugins", "address", l.Addr().String(), "dnsNames", names)
	if f.metricsAddr != "" {
		ml, err := net.Listen("tcp", f.metricsAddr)
		if err != nil {
			return fmt.Errorf("metrics address: %w", err)
		}
		hs := &http.Server{Handler: m.Handler(certs.Ready), ReadHeaderTimeout: 10 * time.Second}
		go func() { _ = hs.Serve(ml) }()
		defer hs.Close()
	}
	elected := make(chan struct{})
	go func() {
		defer close(elected)
		lead(ctx, cs, f, m.Leading, func(lctx context.Context) {
			if plugins.RunController != nil {
				go func() {
					if err := plugins.RunController(lctx, iss, m.InventoryRevocation); err != nil && lctx.Err() == nil {
						klog.ErrorS(err, "Inventory controller stopped")
					}
				}()
			}
			iss.Run(lctx)
		})
	}()
	err = srv.Serve(ctx, l, certs.GetCertificate)
	stop()
	<-elected // the Lease is released before the process goes: the other replica leads at once
	return err
}

// readIssuerConfig reads the postgres section of the backend file; its
// errors never quote the file (admin credentials).
func readIssuerConfig(path string) (pgengine.Config, error) {
	if path == "" {
		return pgengine.Config{}, errors.New("--backend-config is required: the issuer holds the postgres admin configuration")
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return pgengine.Config{}, fmt.Errorf("backend config: %w", err)
	}
	cfg, err := decodeBackends(path, data)
	if err != nil {
		return pgengine.Config{}, err
	}
	if cfg.Postgres == nil {
		return pgengine.Config{}, fmt.Errorf("backend config %s: no postgres section", path)
	}
	return *cfg.Postgres, nil
}

// plugins are what the inventory (pkg/inventory) adds to the issuer.
type plugins struct {
	// Inventory records every credential (every replica writes).
	Inventory issuer.Inventory
	// RunController runs the inventory's controller on the leader until
	// ctx is done (the leader's term); each revocation's outcome is told
	// to revoked.
	RunController func(ctx context.Context, iss *issuer.Issuer, revoked func(error)) error
	// Revoking is the backlog of records being revoked (metrics).
	Revoking func() metrics.Revoking
}

// issuerPlugins wires the inventory: one informer of every Credential,
// run on every replica (the Recorder reads its records from it), and the
// Controller, run by the leader, that revokes through the issuer the
// credential of a record being deleted (the Pod gone, the kill switch),
// retrying a failure after at most retryMax.
func issuerPlugins(ctx context.Context, rc *rest.Config, pods corev1client.PodsGetter, retryMax time.Duration, id string) (plugins, error) {
	c, err := inventory.NewClient(rc)
	if err != nil {
		return plugins{}, err
	}
	dyn, err := dynamic.NewForConfig(rc)
	if err != nil {
		return plugins{}, err
	}
	inf := inventory.NewInformer(c, "", 0)
	go inf.Run(ctx.Done())
	sctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	if !cache.WaitForCacheSync(sctx.Done(), inf.HasSynced) {
		return plugins{}, errors.New("the inventory's Credentials did not sync (is the CRD installed?)")
	}
	// The Recorder is the issuer's Inventory, and tells its Withdrawals
	// (an optional interface the issuer looks for).
	var _ issuer.Withdrawals = (*inventory.Recorder)(nil)
	// It records what the issuer sees of each credential's use too.
	var _ issuer.UseRecorder = (*inventory.Recorder)(nil)
	return plugins{
		// A credential used elsewhere is a Warning event on its pod.
		Inventory: inventory.NewRecorder(c, inf, inventory.WithWarnings(events.NewRecorder(dyn, "ephemeral-secrets-csi-issuer", id))),
		RunController: func(ctx context.Context, iss *issuer.Issuer, revoked func(error)) error {
			revoke := func(ctx context.Context, e credential.Record) error {
				conn, role, _ := strings.Cut(e.Role, "/")
				err := iss.Drop(ctx, issuer.Caller{}, postgres.DropRequest{LeaseID: e.LeaseID, Name: e.Name,
					Params: map[string]string{postgres.ConnectionParam: conn, postgres.RoleParam: role}})
				revoked(err)
				return err
			}
			// Its own records only: the housekeeper (always on) does the rest.
			// client-go's controller default, with the per-record backoff
			// capped at retryMax instead of 1000 s: the alert on a record
			// stuck in Revoking counts on a retry at least that often.
			rl := workqueue.NewTypedMaxOfRateLimiter(
				workqueue.NewTypedItemExponentialFailureRateLimiter[string](5*time.Millisecond, retryMax),
				&workqueue.TypedBucketRateLimiter[string]{Limiter: rate.NewLimiter(rate.Limit(10), 100)})
			return inventory.NewController(c, inf, pods, revoke, inventory.ControllerOptions{RateLimiter: rl, RevokeOnly: true}).Run(ctx, 2)
		},
		Revoking: func() metrics.Revoking { return inventory.Revoking(inf.GetStore(), time.Now()) },
	}, nil
}

// lead takes part in the election until ctx is done, and runs work
// while it leads (ctx of work ends when leadership does). A replica that
// loses the Lease stands again.
func lead(ctx context.Context, cs kubernetes.Interface, f issuerFlags, leading func(bool), work func(context.Context)) {
	lock := &resourcelock.LeaseLock{
		LeaseMeta:  metav1.ObjectMeta{Namespace: f.namespace, Name: f.leaseName},
		Client:     cs.CoordinationV1(),
		LockConfig: resourcelock.ResourceLockConfig{Identity: f.id},
	}
	for ctx.Err() == nil {
		le, err := leaderelection.NewLeaderElector(leaderelection.LeaderElectionConfig{
			Lock: lock, ReleaseOnCancel: true, Name: f.leaseName,
			LeaseDuration: f.leaseDuration, RenewDeadline: f.renewDeadline, RetryPeriod: f.retryPeriod,
			Callbacks: leaderelection.LeaderCallbacks{
				OnStartedLeading: func(lctx context.Context) {
					klog.InfoS("Leading: reaping and running the inventory controller", "identity", f.id)
					leading(true)
					work(lctx)
				},
				OnStoppedLeading: func() {
					leading(false)
					klog.InfoS("Not leading", "identity", f.id)
				},
				OnNewLeader: func(id string) { klog.V(2).InfoS("Leader", "identity", id) },
			},
		})
		if err != nil {
			klog.ErrorS(err, "Leader election")
			return
		}
		le.Run(ctx)
	}
}

// reapCounter counts the reaper's passes (metrics.Metrics for the
// driver's in-process issuer, metrics.Issuer for the cluster issuer).
type reapCounter interface {
	Reaped(expired, untracked, failures int)
}

// countReaps is the reaper's OnReap that counts each pass in m.
func countReaps(m reapCounter) func(issuer.ReapReport, error) {
	return func(r issuer.ReapReport, _ error) { m.Reaped(r.Expired, r.Untracked, r.Failed+r.Unlisted) }
}
