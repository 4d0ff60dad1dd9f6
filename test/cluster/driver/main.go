// Command driver is the cluster tests' build of the node plugin: the real
// all-in-one command (ephemeral-secrets-csi-all: the suites use the aws
// provider and the issuer in process) with one more provider, "whoami",
// which proves that the pod's own service-account token reaches providers
// intact. Its Issue presents the token to the API server (a
// SelfSubjectReview) and returns the identity the server saw. Never part
// of the shipped binary.
package main

import (
	"context"
	"fmt"
	"os"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/ephemeral-secrets/csi-driver/pkg/cli/allinone"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// whoami asks the API server who the pod's token (audience "vault") is.
type whoami struct {
	host string
	ca   []byte
}

func (w whoami) Issue(ctx context.Context, req provider.Request) (provider.Lease, error) {
	tok, ok := req.Tokens["vault"]
	if !ok {
		return provider.Lease{}, fmt.Errorf("%w: no token for audience vault", provider.ErrPermissionDenied)
	}
	c, err := kubernetes.NewForConfig(&rest.Config{Host: w.host, BearerToken: tok.Token, TLSClientConfig: rest.TLSClientConfig{CAData: w.ca}})
	if err != nil {
		return provider.Lease{}, err
	}
	r, err := c.AuthenticationV1().SelfSubjectReviews().Create(ctx, &authenticationv1.SelfSubjectReview{}, metav1.CreateOptions{})
	if apierrors.IsUnauthorized(err) {
		return provider.Lease{}, fmt.Errorf("%w: the API server refused the pod's token", provider.ErrPermissionDenied)
	}
	if err != nil {
		return provider.Lease{}, fmt.Errorf("%w: %v", provider.ErrUnavailable, err)
	}
	now := time.Now()
	return provider.Lease{Values: map[string]string{"identity": r.Status.UserInfo.Username}, IssuedAt: now, ExpiresAt: now.Add(time.Hour)}, nil
}

func (whoami) Renew(_ context.Context, l provider.Lease) (provider.Lease, error) {
	return l, provider.ErrNotRenewable
}

func (whoami) Revoke(context.Context, provider.Lease) error { return nil }

func main() {
	ca, err := os.ReadFile(os.Getenv("WHOAMI_CA_FILE"))
	if err != nil {
		fmt.Fprintln(os.Stderr, "WHOAMI_CA_FILE:", err)
		os.Exit(1)
	}
	w := whoami{host: os.Getenv("WHOAMI_API_SERVER"), ca: ca}
	os.Exit(allinone.Main("cluster-test", os.Args[1:], func(r *provider.Registry) error {
		return r.Register("whoami", w)
	}))
}
