package cli

import (
	"fmt"
	"os"

	"sigs.k8s.io/yaml"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider/aws"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider/postgres"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider/vault"
)

// backendConfig is the admin's backend file: one section per provider.
type backendConfig struct {
	Postgres *postgres.Config `json:"postgres,omitempty"`
	Vault    *vault.Config    `json:"vault,omitempty"`
	AWS      *aws.Config      `json:"aws,omitempty"`
}

// loadBackends reads the backend file and builds the providers it
// configures. An empty path configures none.
func loadBackends(path string) (*provider.Registry, func(), error) {
	reg := &provider.Registry{}
	closers := []func(){}
	closeAll := func() {
		for _, c := range closers {
			c()
		}
	}
	if path == "" {
		return reg, closeAll, nil
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, fmt.Errorf("backend config: %w", err)
	}
	var cfg backendConfig
	if err := yaml.UnmarshalStrict(data, &cfg); err != nil {
		// The YAML library's message can quote the offending line; this file holds admin credentials.
		return nil, nil, fmt.Errorf("backend config %s: not valid (check its keys and indentation)", path)
	}
	add := func(name string, p provider.Provider, err error) error {
		if err != nil {
			return err
		}
		return reg.Register(name, p)
	}
	if cfg.Postgres != nil {
		p, err := postgres.New(*cfg.Postgres)
		if err := add(postgres.Name, p, err); err != nil {
			return nil, nil, err
		}
		closers = append(closers, p.Close)
	}
	if cfg.Vault != nil {
		p, err := vault.New(*cfg.Vault)
		if err := add(vault.Name, p, err); err != nil {
			return nil, nil, err
		}
	}
	if cfg.AWS != nil {
		p, err := aws.New(*cfg.AWS)
		if err := add(aws.Name, p, err); err != nil {
			return nil, nil, err
		}
	}
	return reg, closeAll, nil
}
