// Package cli is the node plugin's command line (ephemeral-secrets-csi):
// "serve" runs the node plugin (CSI Identity and Node services),
// "leases" lists the node's live credentials, "check-config" checks a
// backend file as the driver would load it (through the all-in-one's,
// which also points at a bad key's line, when that is beside it). It links no typed Kubernetes
// client, no informer factory, no leader election, no issuer and no AWS
// SDK: a DaemonSet pays for every page of them on every node. The
// cluster's commands (the issuer, the housekeeper, the uninstall hook)
// and the node plugin with every provider and the issuer in process are
// ephemeral-secrets-csi-all (pkg/cli/allinone), which runs this command
// line with Options; ephemeral-secrets-csi-aws is this command line with
// the aws section (pkg/cli/awssection, MainOf). The binary's main only
// calls Main; a build with extra providers (the benchmark's) passes them
// in.
package cli

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"sync/atomic"
	"syscall"
	"text/tabwriter"
	"time"

	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"

	"github.com/ephemeral-secrets/csi-driver/pkg/audit"
	"github.com/ephemeral-secrets/csi-driver/pkg/credential"
	"github.com/ephemeral-secrets/csi-driver/pkg/driver"
	"github.com/ephemeral-secrets/csi-driver/pkg/events"
	"github.com/ephemeral-secrets/csi-driver/pkg/inventory/record"
	"github.com/ephemeral-secrets/csi-driver/pkg/lease"
	"github.com/ephemeral-secrets/csi-driver/pkg/leaseapi"
	"github.com/ephemeral-secrets/csi-driver/pkg/limits"
	"github.com/ephemeral-secrets/csi-driver/pkg/metrics"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/render"
	"github.com/ephemeral-secrets/csi-driver/pkg/spc"
	"github.com/ephemeral-secrets/csi-driver/pkg/storage"
)

// Register adds providers to the registry a serving driver uses, beside
// those the backend configuration sets up.
type Register func(*provider.Registry) error

// Options are what a build adds to the node plugin's command line.
type Options struct {
	// Extra are providers a serving driver registers beside those of the
	// backend file (the benchmark's).
	Extra []Register
	// Sections serve the backend file's sections beyond vault and gcp,
	// by key ("postgres", "aws"); a section without one is refused.
	Sections map[string]Section
	// Locate says where in a backend file that does not load the bad keys
	// are (check-config), quoting no value; nil: check-config gives the
	// verdict only. It walks the YAML with a second parser, which the node
	// plugin does not link: its check-config runs the all-in-one's when
	// that is beside it (Sibling), as in the image.
	Locate func(data []byte) []string
	// CheckIssuer loads a file as the issuer does (check-config --side
	// issuer), returning what it configures; nil: that side is refused.
	CheckIssuer func(path string) (string, error)
	// Commands are more subcommands, by name (the issuer's).
	Commands map[string]func(version string, args []string) error
	// Sibling, if set, is the binary that runs the commands this build
	// lacks (the cluster's) and check-config, which knows every section
	// and side: ephemeral-secrets-csi-all beside the node plugin in the
	// image. The process becomes it (exec), with the same arguments.
	Sibling string
}

// AllBinary is the all-in-one binary's name.
const AllBinary = "ephemeral-secrets-csi-all"

// Main runs the node plugin's command with args (without the program
// name) and returns the exit code. The cluster's commands and
// check-config are run by ephemeral-secrets-csi-all when it is beside
// this binary (as in the image).
func Main(version string, args []string, extra ...Register) int {
	return MainOf(version, args, Options{Extra: extra})
}

// MainOf is Main for a node plugin that o extends with sections
// (ephemeral-secrets-csi-aws): ephemeral-secrets-csi-all beside the
// binary, unless o names another Sibling, runs the cluster's commands and
// check-config.
func MainOf(version string, args []string, o Options) int {
	if o.Sibling == "" {
		if self, err := os.Executable(); err == nil {
			o.Sibling = filepath.Join(filepath.Dir(self), AllBinary)
		}
	}
	return Run(version, args, o)
}

// movedCommands are the commands of ephemeral-secrets-csi-all.
var movedCommands = []string{"issuer", "housekeeper", "uninstall"}

// Run runs the command with args (without the program name) as o builds
// it and returns the exit code.
func Run(version string, args []string, o Options) int {
	if len(args) > 0 && (args[0] == "check-config" || slices.Contains(movedCommands, args[0])) && o.Sibling != "" {
		if _, err := os.Stat(o.Sibling); err == nil {
			err = syscall.Exec(o.Sibling, append([]string{o.Sibling}, args...), os.Environ())
			fmt.Fprintf(os.Stderr, "running %s: %v\n", o.Sibling, err)
			return 1
		}
	}
	if len(args) > 0 && args[0] == "check-config" {
		return CheckConfig(o, args[1:], os.Stdout, os.Stderr)
	}
	cmd := "serve"
	if len(args) > 0 && (args[0] == "serve" || args[0] == "leases" || args[0] == "version" ||
		o.Commands[args[0]] != nil || slices.Contains(movedCommands, args[0])) {
		cmd, args = args[0], args[1:]
	}
	var err error
	switch {
	case o.Commands[cmd] != nil:
		err = o.Commands[cmd](version, args)
	case slices.Contains(movedCommands, cmd):
		err = fmt.Errorf("%s is a command of %s (in the same image), not of the node plugin", cmd, AllBinary)
	case cmd == "serve":
		err = serve(version, args, o)
	case cmd == "leases":
		err = leases(args, os.Stdout)
	case cmd == "version":
		fmt.Println(version)
	}
	if err != nil {
		klog.ErrorS(err, "Exiting")
		klog.Flush()
		return 1
	}
	return 0
}

type serveFlags struct {
	endpoint, nodeID, stateDir, kubeletDir, classes, backends, auditLog string
	metricsAddr, kubeconfig, registrationDir, registrationPath          string
	lockFile                                                            string
	maxVolumeBytes                                                      int64
	sweep, retryMin, retryMax, backendTimeout, rotationGrace            time.Duration
	backendReload, reapInterval, useInterval                            time.Duration
	renewFraction                                                       float64
	tokensInSecrets, watchInventory, recordCredentials                  bool
	limits                                                              limits.Options
	leaseAPI                                                            leaseapi.Options
	maxTasks, revocationWorkers                                         int
	issuer                                                              issuerClientFlags
}

func serve(version string, args []string, o Options) error {
	extra := o.Extra
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	klog.InitFlags(fs)
	host, _ := os.Hostname()
	var f serveFlags
	fs.StringVar(&f.endpoint, "endpoint", "unix:///csi/csi.sock", "CSI endpoint (unix:///path)")
	fs.StringVar(&f.nodeID, "node-id", host, "node ID reported by NodeGetInfo")
	fs.StringVar(&f.stateDir, "state-dir", "/run/ephemeral-secrets-csi", "state directory; covered by a tmpfs unless it is one")
	fs.StringVar(&f.kubeletDir, "kubelet-dir", "/var/lib/kubelet", "kubelet root directory: targets must be under its pods/")
	fs.StringVar(&f.classes, "classes-file", "", "YAML file of SecretProviderClass documents, instead of the cluster's")
	fs.BoolVar(&f.watchInventory, "watch-credentials", true, "in a cluster, watch the node's Credential records: deleting one (the kill switch) withdraws its volume's credential")
	fs.BoolVar(&f.recordCredentials, "record-credentials", true, "in a cluster, record each credential the node revokes itself (every provider but postgres, which the issuer records) as a Credential held by the node's finalizer")
	fs.StringVar(&f.kubeconfig, "kubeconfig", "", "kubeconfig for the Kubernetes API; empty: the in-cluster service account")
	fs.StringVar(&f.backends, "backend-config", "", "YAML file configuring the backends (admin credentials; mount it from a Secret)")
	fs.DurationVar(&f.backendReload, "backend-reload-interval", 10*time.Second, "how often the backend file is checked for a change (a new Secret from kubelet); 0: never, read at start only")
	fs.DurationVar(&f.reapInterval, "reap-interval", 30*time.Second, "how often the in-process issuer (ephemeral-secrets-csi-all) drops the postgres roles it tagged whose VALID UNTIL passed, ending their sessions")
	fs.DurationVar(&f.useInterval, "use-interval", time.Second, "how often the in-process issuer (ephemeral-secrets-csi-all) samples the sessions of the postgres roles it made: each credential's use, and a use from an address the connection's expectedSources do not list; at least 100ms; 0: use is not observed")
	fs.StringVar(&f.auditLog, "audit-log", "-", "where audit records go: - for stdout, or a file path")
	fs.Int64Var(&f.maxVolumeBytes, "max-volume-bytes", 1<<20, "size cap of one volume's files")
	fs.DurationVar(&f.sweep, "sweep-interval", time.Minute, "how often volumes whose target vanished are looked for")
	fs.DurationVar(&f.retryMin, "retry-min", time.Second, "first retry delay of a failed renewal or revocation")
	fs.DurationVar(&f.retryMax, "retry-max", time.Minute, "longest retry delay")
	fs.DurationVar(&f.rotationGrace, "rotation-grace", 5*time.Second, "how long a rotated-out credential stays valid for readers of the old files (never past its expiry; negative: revoke at once)")
	fs.DurationVar(&f.backendTimeout, "backend-timeout", 30*time.Second, "bound on one backend call")
	fs.IntVar(&f.revocationWorkers, "revocation-workers", 8, "revocations run at once: a backlog left by a backend outage drains in parallel")
	fs.Float64Var(&f.renewFraction, "renew-fraction", 2.0/3, "fraction of a lease's TTL after which it is renewed")
	fs.StringVar(&f.registrationDir, "registration-dir", "", "kubelet's plugins_registry directory as mounted here: the driver registers itself with kubelet there; empty: no registration (node-driver-registrar's job)")
	fs.StringVar(&f.registrationPath, "kubelet-registration-path", "", "the CSI socket's path on the host, as kubelet dials it (default <kubelet-dir>/plugins/"+driver.Name+"/csi.sock)")
	fs.StringVar(&f.lockFile, "lock-file", "", "the node lock: one driver per node serves the socket, the registration and the state; another waits for it (default: "+driver.LockFileName+" beside the CSI socket)")
	fs.StringVar(&f.metricsAddr, "metrics-address", ":9810", "where /metrics, /healthz and /readyz are served; empty: nowhere")
	fs.BoolVar(&f.tokensInSecrets, "tokens-in-secrets", true, "kubelet passes service-account tokens in the request's secrets "+
		"(the CSIDriver's serviceAccountTokenInSecrets); false: in the volume context. Tokens anywhere else are refused")
	fs.IntVar(&f.limits.PerNamespace, "max-leases-per-namespace", 0, "live credentials one namespace may hold on the node; 0: no cap")
	fs.IntVar(&f.limits.PerNode, "max-leases-per-node", 0, "live credentials the node may hold; 0: no cap")
	fs.Float64Var(&f.limits.Rate, "publish-rate-per-namespace", 0, "new volumes per second one namespace may start on the node; 0: no limit")
	fs.IntVar(&f.limits.Burst, "publish-burst-per-namespace", 0, "bursts allowed above that rate (default: the rate, at least 1)")
	fs.Float64Var(&f.leaseAPI.Rate, "lease-api-rate", 5, "calls per second one volume's lease socket answers")
	fs.IntVar(&f.leaseAPI.Burst, "lease-api-burst", 10, "bursts allowed above that rate")
	fs.IntVar(&f.maxTasks, "max-tasks-per-volume", render.DefaultMaxTasksCap, "cap on a class's maxTasks: live task leases one volume may hold")
	f.issuer.register(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if r, err := f.issuer.registerIssuer(f.kubeconfig, version); err != nil {
		return err
	} else if r != nil {
		extra = append(extra, r)
	}
	inCluster := os.Getenv("KUBERNETES_SERVICE_HOST") != ""
	if f.classes == "" && f.kubeconfig == "" && !inCluster {
		return errors.New("no classes: give --classes-file, or run in a cluster (or give --kubeconfig)")
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	auditOut, closeAudit, err := OpenAudit(f.auditLog)
	if err != nil {
		return err
	}
	defer closeAudit()
	var mgr *lease.Manager
	var running atomic.Pointer[lease.Manager] // mgr, once the node lock is held
	m := metrics.New(func() metrics.State {
		if mg := running.Load(); mg != nil {
			return mg.State()
		}
		return metrics.State{}
	})
	node, err := holdNode(ctx, &f, m)
	if node == nil {
		return err // nil: stopped while it waited
	}
	defer node.Release() // last: the next instance goes on once this one let go of everything
	reg := node.reg
	store, err := storage.Open(f.stateDir, storage.Options{MaxVolumeBytes: f.maxVolumeBytes})
	if err != nil {
		return err
	}
	auditLog := audit.New(auditOut)
	// Replaced providers are closed once no call with them can be left:
	// each is bounded by the backend timeout (twice it, for a call that
	// took the provider just before the swap).
	grace := 2 * f.backendTimeout
	if grace <= 0 {
		grace = time.Minute // the lease manager's default timeout, twice
	}
	if f.useInterval != 0 && f.useInterval < 100*time.Millisecond {
		return errors.New("--use-interval is at least 100ms (0: use is not observed)")
	}
	inProc := InProcess{Reap: f.reapInterval, UseInterval: f.useInterval,
		WithdrawFiles: func(ctx context.Context, e credential.Record, reason string) error {
			mg := running.Load()
			if mg == nil {
				return errors.New("the lease manager is not running yet")
			}
			return withdrawLease(ctx, mg, lease.NewStateRecords(store), e.LeaseID, "killed: "+reason)
		}}
	providers, err := loadBackends(f.backends, f.issuer.address != "", extra, grace, inProc, auditLog, m, o.Sections)
	if err != nil {
		return err
	}
	defer providers.Close()
	targets := storage.TargetPolicy{KubeletDir: f.kubeletDir}

	var classes spc.Resolver
	var sink events.Sink
	var apiConfig *rest.Config // nil: no cluster
	if f.kubeconfig != "" || inCluster {
		cfg, err := clientcmd.BuildConfigFromFlags("", f.kubeconfig)
		if err != nil {
			return fmt.Errorf("kubernetes client: %w", err)
		}
		cfg.UserAgent = "ephemeral-secrets-csi/" + version
		cfg.WrapTransport = m.CountRequests
		apiConfig = cfg
		dyn, err := dynamic.NewForConfig(cfg)
		if err != nil {
			return err
		}
		rec := events.NewRecorder(dyn, driver.Name, f.nodeID)
		go rec.Run(ctx)
		sink = rec
		if f.classes == "" {
			kr := spc.NewKubeResolver(dyn, 10*time.Minute)
			sctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
			err = kr.Start(ctx, sctx)
			cancel()
			if err != nil {
				return fmt.Errorf("watching SecretProviderClasses (is the CRD installed?): %w", err)
			}
			classes = kr
		}
	}
	if f.classes != "" {
		fr, err := spc.NewFileResolver(f.classes)
		if err != nil {
			return err
		}
		classes = fr
	}
	var records lease.Records
	if apiConfig != nil && f.recordCredentials {
		rc, err := record.NewClient(apiConfig)
		if err != nil {
			return err
		}
		records = newNodeRecords(rc, f.nodeID)
	}
	f.leaseAPI.Dir, f.leaseAPI.Audit, f.leaseAPI.Metric = store.DataDir, auditLog, m
	sockets := leaseapi.New(f.leaseAPI)
	mgr = lease.New(lease.Options{
		Metrics: m,
		Store:   lease.NewStore(store), Providers: providers.reg, Classes: classes, Audit: auditLog,
		VerifyTarget:  targets.CheckNoSymlinks,
		RenewFraction: f.renewFraction, RetryMin: f.retryMin, RetryMax: f.retryMax, RotationGrace: f.rotationGrace,
		BackendTimeout: f.backendTimeout, SweepInterval: f.sweep,
		Render:  render.Limits{MaxBytes: f.maxVolumeBytes, MaxTasks: f.maxTasks},
		Sockets: sockets,
		Records: records, RevocationWorkers: f.revocationWorkers,
	})
	sockets.Leases = mgr
	running.Store(mgr)
	defer sockets.Shutdown()
	defer mgr.Close()
	l, err := driver.Listen(f.endpoint)
	if err != nil {
		return err
	}
	lo := f.limits
	lo.Metrics = m
	tokens := spc.TokensFromSecrets
	if !f.tokensInSecrets {
		tokens = spc.TokensFromVolumeContext
	}
	d := driver.New(driver.Options{NodeID: f.nodeID, Version: version, Leases: mgr, Targets: targets, Metrics: m, Events: sink, Tokens: tokens,
		Admission: limits.New(mgr, lo)})
	if reg != nil {
		regDone := make(chan struct{})
		defer func() { stop(); <-regDone }() // the socket goes before the process: kubelet deregisters the driver
		go func() {
			defer close(regDone)
			if err := reg.Run(ctx); err != nil {
				klog.ErrorS(err, "Kubelet plugin registration stopped")
				stop()
			}
		}()
	}
	// Serve at once (Probe says not ready) and recover meanwhile.
	errc := make(chan error, 1)
	go func() { errc <- d.Serve(ctx, l) }()
	go providers.Watch(ctx, f.backendReload) // a fixed admin password also helps the recovery
	if err := mgr.Recover(ctx); err != nil {
		return fmt.Errorf("recovery: %w", err)
	}
	go mgr.Run(ctx)
	if apiConfig != nil && f.watchInventory {
		if err := watchInventory(ctx, apiConfig, f.nodeID, mgr, lease.NewStateRecords(store), sink); err != nil {
			return fmt.Errorf("watching the node's credential records: %w", err)
		}
	}
	select {
	case <-ctx.Done():
		err := <-errc
		mgr.Close()
		// With nothing to resume (an uninstall after the pods are gone),
		// leave nothing on the node; otherwise the next start resumes it.
		if released, rerr := store.Release(); rerr != nil {
			klog.ErrorS(rerr, "Releasing the state directory")
		} else if released {
			klog.InfoS("Shutting down with no live lease and no pending revocation; state directory released")
		} else {
			klog.InfoS("Shutting down; live leases and pending revocations are resumed at the next start")
		}
		return err
	case err := <-errc:
		return err
	}
}

// OpenAudit opens where audit records go: - (or empty) for stdout, else a
// file appended to; the func closes it.
func OpenAudit(path string) (io.Writer, func(), error) {
	if path == "-" || path == "" {
		return os.Stdout, func() {}, nil
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, nil, fmt.Errorf("audit log: %w", err)
	}
	return f, func() { _ = f.Close() }, nil
}

// leases prints the node's live leases and pending revocations. It reads
// the state directory only: nothing secret is printed.
func leases(args []string, out io.Writer) error {
	fs := flag.NewFlagSet("leases", flag.ContinueOnError)
	stateDir := fs.String("state-dir", "/run/ephemeral-secrets-csi", "the driver's state directory")
	asJSON := fs.Bool("json", false, "print JSON")
	if err := fs.Parse(args); err != nil {
		return err
	}
	store, err := storage.OpenExisting(*stateDir)
	if err != nil {
		return err
	}
	inv, err := lease.ReadInventory(lease.NewStateRecords(store))
	if err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		return enc.Encode(inv)
	}
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "LIVE LEASES (%d)\n", len(inv.Live))
	fmt.Fprintln(tw, "POD\tSERVICE ACCOUNT\tCLASS\tPROVIDER\tROLE\tLEASE\tSTATE\tEXPIRES")
	for _, l := range inv.Live {
		fmt.Fprintf(tw, "%s/%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", l.Pod.Namespace, l.Pod.Name, l.Pod.ServiceAccount,
			l.Class, l.Provider, l.Role, l.LeaseID, l.State, when(l.ExpiresAt))
	}
	fmt.Fprintf(tw, "\nPENDING REVOCATIONS (%d)\n", len(inv.Pending))
	fmt.Fprintln(tw, "POD\tPROVIDER\tROLE\tLEASE\tREASON\tQUEUED\tATTEMPTS\tLAST ERROR")
	for _, p := range inv.Pending {
		fmt.Fprintf(tw, "%s/%s\t%s\t%s\t%s\t%s\t%s\t%d\t%s\n", p.Pod.Namespace, p.Pod.Name, p.Provider, p.Role,
			p.LeaseID, p.Reason, when(p.EnqueuedAt), p.Attempts, p.LastError)
	}
	return tw.Flush()
}

func when(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.UTC().Format(time.RFC3339)
}
