package record

import (
	"context"
	"fmt"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/rest"

	v1alpha1 "github.com/ephemeral-secrets/csi-driver/pkg/apis/ephemeralsecrets/v1alpha1"
)

// Client reads and writes Credential objects: a typed REST client of the
// inventory's API group.
type Client struct {
	rest rest.Interface
}

// NewClient makes a Client from a configuration of the API server (the
// in-cluster one, or a kubeconfig's). Without a QPS of its own, the
// client allows 100 requests a second, bursts of 200.
func NewClient(cfg *rest.Config) (*Client, error) {
	scheme := runtime.NewScheme()
	if err := v1alpha1.AddToScheme(scheme); err != nil {
		return nil, err
	}
	c := rest.CopyConfig(cfg)
	c.GroupVersion = &v1alpha1.SchemeGroupVersion
	c.APIPath = "/apis"
	c.NegotiatedSerializer = serializer.NewCodecFactory(scheme).WithoutConversion()
	// client-go's default (5 per second, bursts of 10) would hold the
	// issuer to about one credential a second (each takes five requests
	// from Issuing to Dropped: create, tombstone read, status, release,
	// delete).
	if c.QPS == 0 && c.RateLimiter == nil {
		c.QPS, c.Burst = 100, 200
	}
	if c.UserAgent == "" {
		c.UserAgent = rest.DefaultKubernetesUserAgent()
	}
	rc, err := rest.RESTClientFor(c)
	if err != nil {
		return nil, fmt.Errorf("inventory client: %w", err)
	}
	return &Client{rest: rc}, nil
}

// Get reads one Credential.
func (c *Client) Get(ctx context.Context, namespace, name string) (*v1alpha1.Credential, error) {
	out := &v1alpha1.Credential{}
	err := c.rest.Get().Namespace(namespace).Resource(v1alpha1.Resource).Name(name).Do(ctx).Into(out)
	return out, err
}

// List lists Credentials of a namespace ("": all of them).
func (c *Client) List(ctx context.Context, namespace string, opts metav1.ListOptions) (*v1alpha1.CredentialList, error) {
	out := &v1alpha1.CredentialList{}
	err := c.rest.Get().Namespace(namespace).Resource(v1alpha1.Resource).
		VersionedParams(&opts, metav1.ParameterCodec).Do(ctx).Into(out)
	return out, err
}

// Watch watches Credentials of a namespace ("": all of them).
func (c *Client) Watch(ctx context.Context, namespace string, opts metav1.ListOptions) (watch.Interface, error) {
	opts.Watch = true
	return c.rest.Get().Namespace(namespace).Resource(v1alpha1.Resource).
		VersionedParams(&opts, metav1.ParameterCodec).Watch(ctx)
}

// Create creates a Credential (its status is dropped by the API server:
// see UpdateStatus).
func (c *Client) Create(ctx context.Context, cred *v1alpha1.Credential) (*v1alpha1.Credential, error) {
	out := &v1alpha1.Credential{}
	err := c.rest.Post().Namespace(cred.Namespace).Resource(v1alpha1.Resource).Body(cred).Do(ctx).Into(out)
	return out, err
}

// Update writes a Credential's metadata (finalizers); its spec cannot
// change and its status is ignored.
func (c *Client) Update(ctx context.Context, cred *v1alpha1.Credential) (*v1alpha1.Credential, error) {
	out := &v1alpha1.Credential{}
	err := c.rest.Put().Namespace(cred.Namespace).Resource(v1alpha1.Resource).Name(cred.Name).
		Body(cred).Do(ctx).Into(out)
	return out, err
}

// UpdateStatus writes a Credential's status.
func (c *Client) UpdateStatus(ctx context.Context, cred *v1alpha1.Credential) (*v1alpha1.Credential, error) {
	out := &v1alpha1.Credential{}
	err := c.rest.Put().Namespace(cred.Namespace).Resource(v1alpha1.Resource).Name(cred.Name).
		SubResource("status").Body(cred).Do(ctx).Into(out)
	return out, err
}

// Delete deletes a Credential (it goes once its finalizers are removed).
func (c *Client) Delete(ctx context.Context, namespace, name string, opts metav1.DeleteOptions) error {
	return c.rest.Delete().Namespace(namespace).Resource(v1alpha1.Resource).Name(name).
		Body(&opts).Do(ctx).Error()
}
