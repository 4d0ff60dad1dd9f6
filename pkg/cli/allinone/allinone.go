// Package allinone is the command line of ephemeral-secrets-csi-all,
// the image's all-in-one binary: the cluster's commands ("issuer", the
// cluster issuer; "housekeeper", the inventory's always-on controller;
// "uninstall", helm's pre-delete hook) and the node plugin's own
// (pkg/cli: "serve", "leases", "check-config") with every provider: the
// postgres section served by an issuer in this process (a cluster without
// the issuer Deployment, the demo) and aws. The node plugin's binaries,
// ephemeral-secrets-csi and ephemeral-secrets-csi-aws (the same with the
// aws section), link none of the rest: leader election, the typed
// clientset and the informers of the inventory's controller and the
// PostgreSQL engine cost a DaemonSet their pages on every node (the AWS
// SDK too, where no aws section is served).
//
// It imports pkg/cli (the node plugin's command line, which it extends
// with Options), pkg/cli/awssection (the aws section, as the aws node
// plugin serves it), pkg/issuer, pkg/issuer/postgres, pkg/issuer/remote and pkg/issuer/use
// (the issuer, its transport, the pod and node resolver of its use
// observation), pkg/inventory (the issuer's recorder,
// the controller, the housekeeper), pkg/provider/aws, pkg/provider/vault,
// pkg/provider/gcp and pkg/provider/postgres (the sections it serves and
// check-config locates), pkg/driver (the
// driver's name), pkg/credential (the record the inventory's controller
// revokes), pkg/audit and pkg/metrics; pkg/events sends the cluster
// issuer's Warning of a credential used elsewhere.
package allinone

import (
	"fmt"
	"os"
	"reflect"
	"slices"
	"strings"

	"sigs.k8s.io/yaml"

	"github.com/ephemeral-secrets/csi-driver/pkg/cli"
	"github.com/ephemeral-secrets/csi-driver/pkg/cli/awssection"
	"github.com/ephemeral-secrets/csi-driver/pkg/issuer"
	pgengine "github.com/ephemeral-secrets/csi-driver/pkg/issuer/postgres"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider/aws"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider/gcp"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider/postgres"
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
type backendConfig struct {
	// Postgres configures the postgres provider: the databases roles are
	// made in, and the roles classes may ask for. Read by the issuer.
	Postgres *pgengine.Config `json:"postgres,omitempty"`
	// Vault configures the vault provider (Vault and OpenBao): the servers
	// classes may name and how each is trusted. Read by the node plugins.
	Vault *vault.Config `json:"vault,omitempty"`
	// AWS configures the aws provider (STS sessions, Secrets Manager and
	// SSM values). Read by the node plugins.
	AWS *aws.Config `json:"aws,omitempty"`
	// GCP configures the gcp provider (a Google access token per pod
	// through Workload Identity Federation, Secret Manager values). Read
	// by the node plugins.
	GCP *gcp.Config `json:"gcp,omitempty"`
}

// Main runs the command with args (without the program name) and returns
// the exit code; extra are providers a serving driver registers beside
// those of the backend file.
func Main(version string, args []string, extra ...cli.Register) int {
	return cli.Run(version, args, Options(extra...))
}

// Options are the node plugin's command line with everything this binary
// adds.
func Options(extra ...cli.Register) cli.Options {
	return cli.Options{
		Extra:       extra,
		Sections:    map[string]cli.Section{"postgres": {Build: postgresSection}, awssection.Name: {Build: awssection.Build}},
		Locate:      func(data []byte) []string { return locate(data, reflect.TypeFor[backendConfig]()) },
		CheckIssuer: checkIssuerFile,
		Commands: map[string]func(string, []string) error{
			"issuer": issuerCmd, "housekeeper": housekeeperCmd, "uninstall": uninstallCmd,
		},
	}
}

// postgresSection serves the postgres section with an issuer in this
// process (the cluster's issuer Deployment is the other transport of the
// same code): the node side mints through iss.Local(). An issuer in this
// process has no inventory; it observes its credentials' use, and kills
// one used from elsewhere by withdrawing its volume (env.WithdrawFiles).
func postgresSection(data []byte, env cli.SectionEnv) (cli.Built, error) {
	var cfg pgengine.Config
	if err := yaml.UnmarshalStrict(data, &cfg); err != nil {
		return cli.Built{}, env.NotValid()
	}
	iss, err := issuer.New(issuer.Options{Config: cfg, ReapInterval: env.Reap, Audit: env.Audit, OnReap: countReaps(env.Metrics),
		// No pods to resolve: the connections' expectedSources only.
		Use: issuer.UseOptions{Interval: env.UseInterval, WithdrawFiles: env.WithdrawFiles, Meter: env.Metrics.Use()}})
	if err != nil {
		return cli.Built{}, err
	}
	return cli.Built{Provider: postgres.NewNode(iss.Local()), Run: iss.Run, Close: iss.Close}, nil
}

// decodeBackends decodes the backend file (read from path) strictly: an
// unknown key is an error. Its error never quotes data: the YAML
// library's message can quote the offending line, and this file holds
// admin credentials.
func decodeBackends(path string, data []byte) (backendConfig, error) {
	var cfg backendConfig
	if err := yaml.UnmarshalStrict(data, &cfg); err != nil {
		return backendConfig{}, fmt.Errorf("backend config %s: not valid (check its keys and indentation)", path)
	}
	return cfg, nil
}

// checkIssuerFile loads path as the issuer command does: its postgres
// section, then the issuer built from it (which checks it and connects
// lazily).
func checkIssuerFile(path string) (string, error) {
	cfg, err := readIssuerConfig(path)
	if err != nil {
		return "", err
	}
	iss, err := issuer.New(issuer.Options{Config: cfg})
	if err != nil {
		return "", err
	}
	defer iss.Close()
	var conns []string
	for name, c := range cfg.Connections {
		roles := make([]string, 0, len(c.Roles))
		for r := range c.Roles {
			roles = append(roles, r)
		}
		slices.Sort(roles)
		conns = append(conns, fmt.Sprintf("%s (roles %s)", name, strings.Join(roles, ", ")))
	}
	slices.Sort(conns)
	summary := "postgres connections " + strings.Join(conns, ", ")
	// readIssuerConfig decoded the whole file; say which sections it leaves
	// to the node plugins.
	if data, err := os.ReadFile(path); err == nil {
		if all, err := decodeBackends(path, data); err == nil {
			var unread []string
			if all.Vault != nil {
				unread = append(unread, "vault")
			}
			if all.AWS != nil {
				unread = append(unread, "aws")
			}
			if all.GCP != nil {
				unread = append(unread, "gcp")
			}
			if len(unread) > 0 {
				summary += "; not read by the issuer: " + strings.Join(unread, ", ") + " (the node plugins' Secret)"
			}
		}
	}
	return summary, nil
}
