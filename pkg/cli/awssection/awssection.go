// Package awssection serves the backend file's aws section (STS sessions,
// Secrets Manager and SSM values) for the two binaries that link the AWS
// SDK: ephemeral-secrets-csi-aws, the node plugin with the aws provider
// (Options), and ephemeral-secrets-csi-all (pkg/cli/allinone), which
// registers Build beside its postgres section. It links nothing of the
// issuer, the inventory's controller, a typed Kubernetes clientset or
// leader election: the aws node plugin is the lean one plus the AWS SDK.
//
// It imports pkg/cli (the node plugin's command line, whose Section it
// serves) and pkg/provider/aws (the provider).
package awssection

import (
	"sigs.k8s.io/yaml"

	"github.com/ephemeral-secrets/csi-driver/pkg/cli"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider/aws"
)

// Name is the section's key in the backend file.
const Name = "aws"

// Build decodes the aws section data strictly and builds its provider,
// which connects to nothing yet. Its errors never quote data.
func Build(data []byte, env cli.SectionEnv) (cli.Built, error) {
	var cfg aws.Config
	if err := yaml.UnmarshalStrict(data, &cfg); err != nil {
		return cli.Built{}, env.NotValid()
	}
	p, err := aws.New(cfg)
	if err != nil {
		return cli.Built{}, err
	}
	return cli.Built{Provider: p}, nil
}

// Options are the node plugin's command line with the aws section
// (ephemeral-secrets-csi-aws); extra are providers a serving driver
// registers beside those of the backend file (the benchmark's).
func Options(extra ...cli.Register) cli.Options {
	return cli.Options{Extra: extra, Sections: map[string]cli.Section{Name: {Build: Build}}}
}
