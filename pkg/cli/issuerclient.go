package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"strings"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/ephemeral-secrets/csi-driver/pkg/issuer/remote/wire"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider/postgres"
)

// issuerClientFlags are the node plugin's flags for a cluster issuer.
type issuerClientFlags struct {
	address, tokenFile, caConfigMap, caFile string
}

func (f *issuerClientFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.address, "issuer-address", "", "the cluster issuer's https://host:port; set, the postgres provider asks it and the node holds no admin credential")
	fs.StringVar(&f.tokenFile, "issuer-token-file", "/var/run/secrets/ephemeral-secrets.csi.dev/issuer/token",
		"the driver pod's projected service-account token for the issuer (audience "+wire.Audience+")")
	fs.StringVar(&f.caConfigMap, "issuer-ca-configmap", "", "namespace/name of the ConfigMap whose ca.crt signs the issuer's certificate")
	fs.StringVar(&f.caFile, "issuer-ca-file", "", "file holding the issuer's signer certificate (instead of --issuer-ca-configmap)")
}

// The core resources the node reads for the issuer, through the dynamic
// client: the typed clientset would link every API group's client.
var (
	configMaps = schema.GroupVersionResource{Version: "v1", Resource: "configmaps"}
	services   = schema.GroupVersionResource{Version: "v1", Resource: "services"}
)

// registerIssuer is the Register that makes the postgres provider ask the
// cluster issuer; nil without --issuer-address. A backend file with a
// postgres section beside it does not load: the node must not hold the
// admin credential.
func (f *issuerClientFlags) registerIssuer(kubeconfig, version string) (Register, error) {
	if f.address == "" {
		return nil, nil
	}
	// The API, where there is one: the issuer's ConfigMap, its Service.
	var api dynamic.Interface
	if kubeconfig != "" || os.Getenv("KUBERNETES_SERVICE_HOST") != "" {
		rc, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
		if err != nil {
			return nil, fmt.Errorf("kubernetes client: %w", err)
		}
		rc.UserAgent = "ephemeral-secrets-csi/" + version
		if api, err = dynamic.NewForConfig(rc); err != nil {
			return nil, err
		}
	}
	var roots wire.Roots
	switch {
	case f.caFile != "" && f.caConfigMap != "":
		return nil, errors.New("give one of --issuer-ca-file and --issuer-ca-configmap")
	case f.caFile != "":
		roots = wire.RootsFile(f.caFile)
	case f.caConfigMap != "" && api == nil:
		return nil, errors.New("--issuer-ca-configmap needs the Kubernetes API (in a cluster, or --kubeconfig)")
	case f.caConfigMap != "":
		ns, name, ok := strings.Cut(f.caConfigMap, "/")
		if !ok || ns == "" || name == "" {
			return nil, fmt.Errorf("--issuer-ca-configmap %q: namespace/name expected", f.caConfigMap)
		}
		roots = wire.RootsConfigMap(func(ctx context.Context) (map[string]string, error) {
			cm, err := api.Resource(configMaps).Namespace(ns).Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				return nil, err
			}
			data, _, err := unstructured.NestedStringMap(cm.Object, "data")
			return data, err
		}, ns, name)
	default:
		return nil, errors.New("--issuer-address needs --issuer-ca-configmap or --issuer-ca-file")
	}
	// A Service's name is dialed at its cluster IP, read through the API:
	// no cluster DNS needed on the node.
	dial := wire.Dial((&net.Dialer{Timeout: 10 * time.Second}).DialContext)
	if api != nil {
		dial = wire.ServiceDial(func(ctx context.Context, namespace, name string) (string, error) {
			svc, err := api.Resource(services).Namespace(namespace).Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				return "", err
			}
			ip, _, err := unstructured.NestedString(svc.Object, "spec", "clusterIP")
			return ip, err
		}, dial)
	}
	c, err := wire.NewClient(wire.ClientOptions{URL: f.address, TokenFile: f.tokenFile, Roots: roots, Dial: dial})
	if err != nil {
		return nil, err
	}
	return func(reg *provider.Registry) error {
		if err := RefuseAdminOnNode(reg); err != nil {
			return err
		}
		return reg.Register(postgres.Name, postgres.NewNode(c))
	}, nil
}

// RefuseAdminOnNode refuses a node plugin's backend configuration with a
// postgres section when a cluster issuer serves PostgreSQL: the node must
// not hold the admin credential.
func RefuseAdminOnNode(reg *provider.Registry) error {
	if _, ok := reg.Get(postgres.Name); ok {
		return errors.New("--issuer-address is set and the backend configuration has a postgres section: " +
			"the admin credential belongs to the issuer; remove the section from the node's backend configuration")
	}
	return nil
}
