package cli

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"k8s.io/klog/v2"
	"sigs.k8s.io/yaml"

	"github.com/ephemeral-secrets/csi-driver/pkg/audit"
	"github.com/ephemeral-secrets/csi-driver/pkg/credential"
	"github.com/ephemeral-secrets/csi-driver/pkg/metrics"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider/gcp"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider/vault"
)

// backendConfig is the admin's backend file (--backend-config of serve
// and of issuer): one section per provider, each optional, in one YAML
// file. In a cluster it is a key of a Secret: the postgres section (which
// holds the admin credential) in the issuer's Secret
// ephemeral-secrets-issuer, the others in the node plugins' Secret
// ephemeral-secrets-backends. A node plugin beside the issuer refuses a
// postgres section; without an issuer (issuer.enabled=false, the demo)
// the node plugin reads every section. The node plugins re-read their
// file when it changes; the issuer reads its file at start only.
//
// This binary serves the vault and gcp sections itself; the others are
// Sections of the build (ephemeral-secrets-csi-aws: aws, see
// pkg/cli/awssection; ephemeral-secrets-csi-all: postgres with the issuer
// in process, and aws), whose types pkg/cli/allinone documents. Here they
// are kept undecoded, so that the node plugin links neither the issuer
// nor the AWS SDK.
type backendConfig struct {
	// Postgres configures the postgres provider (a Section).
	Postgres json.RawMessage `json:"postgres,omitempty"`
	// Vault configures the vault provider (Vault and OpenBao): the servers
	// classes may name and how each is trusted. Read by the node plugins.
	Vault *vault.Config `json:"vault,omitempty"`
	// AWS configures the aws provider (a Section).
	AWS json.RawMessage `json:"aws,omitempty"`
	// GCP configures the gcp provider (a Google access token per pod
	// through Workload Identity Federation, Secret Manager values). Read
	// by the node plugins.
	GCP *gcp.Config `json:"gcp,omitempty"`
}

// decodeBackends decodes the backend file (read from path) strictly: an
// unknown key is an error. Its error never quotes data: the YAML
// library's message can quote the offending line, and this file holds
// admin credentials.
func decodeBackends(path string, data []byte) (backendConfig, error) {
	var cfg backendConfig
	if err := yaml.UnmarshalStrict(data, &cfg); err != nil {
		return backendConfig{}, errNotValid(path)
	}
	return cfg, nil
}

func errNotValid(path string) error {
	return fmt.Errorf("backend config %s: not valid (check its keys and indentation)", path)
}

// Section serves one section of the backend file that the node plugin
// does not carry itself (ephemeral-secrets-csi-all's postgres, with the
// issuer in process, and aws).
type Section struct {
	// Build decodes data (the section as JSON) strictly and builds its
	// provider, connecting to nothing yet. Its errors never quote data.
	Build func(data []byte, env SectionEnv) (Built, error)
}

// SectionEnv is what a Section's provider may use.
type SectionEnv struct {
	// Path is the backend file's (for errors, which never quote data).
	Path string
	InProcess
	Audit   *audit.Logger
	Metrics *metrics.Metrics
}

// NotValid is the error of a section that does not decode, said as of
// the whole file (check-config locates the key): it never quotes data.
func (e SectionEnv) NotValid() error { return errNotValid(e.Path) }

// InProcess is what an issuer in the driver's process is given beside
// its section (ephemeral-secrets-csi-all serve, without a cluster issuer).
type InProcess struct {
	// Reap is how often it reaps expired roles.
	Reap time.Duration
	// UseInterval is how often it samples the sessions of the roles it
	// made (their use); 0: not observed.
	UseInterval time.Duration
	// WithdrawFiles withdraws the files of a credential it killed for a
	// foreign use (the node's lease manager, once it runs).
	WithdrawFiles func(ctx context.Context, e credential.Record, reason string) error
}

// Built is a Section's provider, and what it runs.
type Built struct {
	Provider provider.Provider
	// Run, if set, runs until ctx is done (an in-process issuer's reaper)
	// in a serving driver; check-config never calls it.
	Run func(ctx context.Context)
	// Close, if set, releases what Build opened.
	Close func()
}

// notServed says why a section this binary has no Section for does not
// load, and where it does.
var notServed = map[string]string{
	"postgres": "a postgres section, which this node plugin does not serve: the admin credential belongs to the issuer " +
		"(--issuer-address); remove the section from the node's backend configuration, or run " +
		"\"ephemeral-secrets-csi-all serve\" (the node plugin with the issuer in process, when there is no cluster issuer)",
	"aws": "an aws section, which this node plugin does not serve: run \"ephemeral-secrets-csi-aws serve\" " +
		"(the chart does with providers.aws.enabled), or \"ephemeral-secrets-csi-all serve\"",
}

// providers builds the providers data (the content of the backend file)
// configures, and those of extra, and connects to nothing: what the
// sections run is returned unstarted, for the caller to run and to
// close. Its errors never quote data: the file holds admin credentials.
// check-config loads a file through it, so what it accepts is what a
// serving driver accepts.
func (b *backends) providers(data []byte) (*provider.Registry, []Built, error) {
	cfg, err := decodeBackends(b.path, data)
	if err != nil {
		return nil, nil, err
	}
	reg := &provider.Registry{}
	var built []Built
	fail := func(err error) (*provider.Registry, []Built, error) {
		closeBuilt(built)
		return nil, nil, err
	}
	add := func(name string, p provider.Provider, err error) error {
		if err != nil {
			return err
		}
		return reg.Register(name, p)
	}
	section := func(name string, raw json.RawMessage) error {
		if len(raw) == 0 || string(raw) == "null" {
			return nil
		}
		s, ok := b.sections[name]
		if !ok {
			return fmt.Errorf("backend config %s: %s", b.path, notServed[name])
		}
		bt, err := s.Build(raw, SectionEnv{Path: b.path, InProcess: b.inProc, Audit: b.audit, Metrics: b.metrics})
		if err != nil {
			return err
		}
		built = append(built, bt)
		return reg.Register(name, bt.Provider)
	}
	// The postgres section is served by an issuer in this process (the
	// cluster's issuer Deployment is the other transport of the same
	// code): its provider mints through it.
	if err := section("postgres", cfg.Postgres); err != nil {
		return fail(err)
	}
	if cfg.Vault != nil {
		p, err := vault.New(*cfg.Vault)
		if err := add(vault.Name, p, err); err != nil {
			return fail(err)
		}
	}
	if err := section("aws", cfg.AWS); err != nil {
		return fail(err)
	}
	if cfg.GCP != nil {
		p, err := gcp.New(*cfg.GCP)
		if err := add(gcp.Name, p, err); err != nil {
			return fail(err)
		}
	}
	for _, r := range b.extra {
		if err := r(reg); err != nil {
			return fail(err)
		}
	}
	return reg, built, nil
}

func closeBuilt(built []Built) {
	for _, bt := range built {
		if bt.Close != nil {
			bt.Close()
		}
	}
}

// build builds the providers of data and extra (providers) and starts
// what the sections run, until the returned closer is called.
func (b *backends) build(data []byte) (*provider.Registry, func(), error) {
	reg, built, err := b.providers(data)
	if err != nil {
		return nil, nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	var running sync.WaitGroup
	for _, bt := range built {
		if bt.Run != nil {
			running.Go(func() { bt.Run(ctx) })
		}
	}
	return reg, func() { cancel(); running.Wait(); closeBuilt(built) }, nil
}

// backends is the serving driver's backend configuration: the registry
// the lease manager reads, kept equal to the backend file.
//
// The file is a mounted Secret: kubelet updates it by writing a new
// directory and swapping a symlink, so its path stays and its content
// changes. Reload reads it through the path and compares a hash of the
// content and of the path the symlinks lead to, which sees that swap (and
// any other write) without watching the directory. The resolved path
// counts so that an update of another key of the Secret (a Vault CA file
// the configuration names, read when providers are built) is loaded too.
type backends struct {
	path  string
	extra []Register
	// grace is how long replaced providers stay open: every call with
	// them is bounded by the backend timeout, so after it none is left.
	grace  time.Duration
	inProc InProcess // what an in-process issuer is given
	// sections serve the sections beyond vault and gcp (none in the node
	// plugin).
	sections map[string]Section
	// optional: a missing file is an empty configuration (the node
	// plugin of a cluster whose issuer serves PostgreSQL needs none; the
	// chart mounts its Secret optional), loaded when it appears.
	optional bool
	audit    *audit.Logger
	metrics  *metrics.Metrics

	reg *provider.Registry // shared with the lease manager; swapped in place

	mu       sync.Mutex // closeCur: Reload sets it, Close may run meanwhile at shutdown
	closeCur func()
	loaded   [sha256.Size]byte // version of the file in use
	failed   [sha256.Size]byte // version that last failed, not retried until it changes
	readErr  bool
	gen      int
}

// loadBackends loads generation 1 of the backend file (none with an empty
// path) and the providers of extra.
func loadBackends(path string, optional bool, extra []Register, grace time.Duration, inProc InProcess, al *audit.Logger, m *metrics.Metrics,
	sections map[string]Section) (*backends, error) {
	b := &backends{path: path, optional: optional, extra: extra, grace: grace, inProc: inProc, audit: al, metrics: m, reg: &provider.Registry{},
		sections: sections}
	var data []byte
	var version [sha256.Size]byte
	if path != "" {
		var err error
		for range 3 { // a swap while read: read again
			if data, version, err = b.read(); !errors.Is(err, errSwapping) {
				break
			}
		}
		if err != nil {
			return nil, err
		}
	}
	reg, closeAll, err := b.build(data)
	if err != nil {
		return nil, err
	}
	b.reg.Replace(reg)
	b.closeCur, b.loaded, b.gen = closeAll, version, 1
	b.logLoaded()
	return b, nil
}

// Close closes the providers in use.
func (b *backends) Close() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.closeCur()
}

// Watch reloads the file every interval until ctx is done.
func (b *backends) Watch(ctx context.Context, interval time.Duration) {
	if b.path == "" || interval <= 0 {
		return
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			b.Reload(ctx)
		}
	}
}

// Reload loads the file if its content changed. A file that does not
// load leaves the configuration in use as it is; one that does replaces
// every provider at once, and the replaced ones are closed after the
// grace period (in the background, until ctx is done).
func (b *backends) Reload(ctx context.Context) {
	data, sum, err := b.read()
	if errors.Is(err, errSwapping) {
		return // the next tick sees the new version whole
	}
	if err != nil {
		if !b.readErr { // once per outage, not at every tick
			b.readErr = true
			b.fail(err)
		}
		return
	}
	b.readErr = false
	if sum == b.loaded || sum == b.failed {
		return
	}
	reg, closeAll, err := b.build(data)
	if err != nil {
		b.failed = sum
		b.fail(err)
		return
	}
	b.mu.Lock()
	b.reg.Replace(reg)
	old := b.closeCur
	b.closeCur = closeAll
	b.mu.Unlock()
	b.loaded, b.failed = sum, [sha256.Size]byte{}
	b.gen++
	b.logLoaded()
	go func() {
		select {
		case <-time.After(b.grace):
		case <-ctx.Done():
		}
		old()
	}()
}

// errSwapping means the file changed while it was read.
var errSwapping = errors.New("backend config changed while read")

// read returns the file's content, read through its path, and its
// version: a hash of the content and of the path the symlinks lead to.
func (b *backends) read() ([]byte, [sha256.Size]byte, error) {
	var sum [sha256.Size]byte
	before, _ := filepath.EvalSymlinks(b.path)
	data, err := os.ReadFile(b.path)
	if b.optional && errors.Is(err, os.ErrNotExist) {
		data, err = nil, nil // hashed as the empty file at no path
	}
	if err != nil {
		return nil, sum, fmt.Errorf("backend config: %w", err)
	}
	if after, _ := filepath.EvalSymlinks(b.path); after != before {
		return nil, sum, errSwapping
	}
	h := sha256.New()
	h.Write([]byte(before))
	h.Write([]byte{0})
	h.Write(data)
	h.Sum(sum[:0])
	return data, sum, nil
}

func (b *backends) logLoaded() {
	klog.InfoS("Backend configuration loaded", "path", b.path, "generation", b.gen, "providers", b.reg.Names())
	b.metrics.BackendConfigLoaded(b.gen)
	b.logAudit(audit.Success, nil)
}

func (b *backends) fail(err error) {
	klog.ErrorS(err, "Backend configuration changed but does not load; the previous one stays in use",
		"path", b.path, "generation", b.gen)
	b.metrics.BackendConfigReloadError()
	b.logAudit(audit.Error, err)
}

func (b *backends) logAudit(outcome string, err error) {
	rec := audit.Record{Stage: audit.Config, Outcome: outcome, Detail: "generation " + strconv.Itoa(b.gen)}
	if err != nil {
		rec.Error = err.Error()
		rec.Detail += " stays in use"
	}
	if aerr := b.audit.Log(rec); aerr != nil {
		klog.ErrorS(aerr, "Writing the audit log")
	}
}
