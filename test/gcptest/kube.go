package gcptest

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net/http"
	"os"
	"testing"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/ephemeral-secrets/csi-driver/test/kube"
)

// Main runs a package's tests with a kube-apiserver, whose
// service-account tokens the stand-in validates, set in *cluster for them.
func Main(m *testing.M, cluster **kube.Cluster) {
	c, err := kube.Start()
	if err != nil {
		fmt.Fprintln(os.Stderr, "kube-apiserver:", err)
		os.Exit(1)
	}
	*cluster = c
	code := m.Run()
	c.Stop()
	os.Exit(code)
}

// OIDCClient is a client for a kube-apiserver's discovery document and
// JWKS, which it serves to authenticated callers: its CA and a bearer token.
func OIDCClient(caPEM []byte, bearer string) *http.Client {
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}}
	return &http.Client{Transport: withBearer{tr, bearer}}
}

type withBearer struct {
	rt     http.RoundTripper
	bearer string
}

func (b withBearer) RoundTrip(r *http.Request) (*http.Response, error) {
	r = r.Clone(r.Context())
	r.Header.Set("Authorization", "Bearer "+b.bearer)
	return b.rt.RoundTrip(r)
}

// PodToken makes namespace ns, service account sa and a pod of it (never
// scheduled) where they are missing, and asks the API server for a token
// of sa bound to the pod, for audience, as kubelet does for a CSI driver.
// It returns the token and the pod's UID.
func PodToken(ctx context.Context, cfg *rest.Config, ns, sa, pod, audience string) (token, podUID string, err error) {
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return "", "", err
	}
	create := func(err error) error {
		if apierrors.IsAlreadyExists(err) {
			return nil
		}
		return err
	}
	if err := create(ignoreObj(cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}))); err != nil {
		return "", "", err
	}
	if err := create(ignoreObj(cs.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa}}, metav1.CreateOptions{}))); err != nil {
		return "", "", err
	}
	if err := create(ignoreObj(cs.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: pod},
		Spec:       corev1.PodSpec{ServiceAccountName: sa, Containers: []corev1.Container{{Name: "app", Image: "registry.invalid/app"}}},
	}, metav1.CreateOptions{}))); err != nil {
		return "", "", err
	}
	p, err := cs.CoreV1().Pods(ns).Get(ctx, pod, metav1.GetOptions{})
	if err != nil {
		return "", "", err
	}
	exp := int64(3600)
	tr, err := cs.CoreV1().ServiceAccounts(ns).CreateToken(ctx, sa, &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{
		Audiences: []string{audience}, ExpirationSeconds: &exp,
		BoundObjectRef: &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod, UID: p.UID},
	}}, metav1.CreateOptions{})
	if err != nil {
		return "", "", err
	}
	return tr.Status.Token, string(p.UID), nil
}

func ignoreObj[T any](_ T, err error) error { return err }
