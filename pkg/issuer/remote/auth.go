package remote

import (
	"context"
	"crypto/sha256"
	"fmt"
	"sync"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	authenticationclient "k8s.io/client-go/kubernetes/typed/authentication/v1"

	"github.com/ephemeral-secrets/csi-driver/pkg/issuer"
	"github.com/ephemeral-secrets/csi-driver/pkg/issuer/remote/wire"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// Audience is the audience of the tokens node plugins present to the
// issuer by default (wire.Audience).
const Audience = wire.Audience

// NodeNameExtra is the extra of a TokenReview that names the node of the
// pod a token is bound to (Kubernetes 1.30 and later: a beta feature on by default before 1.32,
// the API server's ServiceAccountTokenPodNodeInfo gate).
const NodeNameExtra = "authentication.kubernetes.io/node-name"

// Authenticator tells who presents a bearer token.
type Authenticator interface {
	Authenticate(ctx context.Context, token string) (issuer.Caller, error)
}

// TokenReviewer authenticates node plugins with the API server's
// TokenReview: the token must be valid for the audience, belong to the
// driver's service account, and be bound to a pod on a node (its node
// is the caller's). Answers are cached briefly, keyed by a hash of the
// token, so a burst of publishes costs one review per node.
type TokenReviewer struct {
	reviews  authenticationclient.TokenReviewInterface
	audience string
	username string
	ttl      time.Duration
	max      int
	now      func() time.Time

	mu    sync.Mutex
	cache map[[sha256.Size]byte]cached
}

type cached struct {
	caller issuer.Caller
	err    error // a refusal, kept as long: a misconfigured node retries often
	until  time.Time
}

// ReviewOptions shape a TokenReviewer.
type ReviewOptions struct {
	// Audience the tokens must have (default Audience).
	Audience string
	// Namespace and ServiceAccount are the driver DaemonSet's: the only
	// identity that may call.
	Namespace, ServiceAccount string
	// CacheTTL is how long a review's answer is reused (default 10s; a
	// revoked token keeps working that long at most).
	CacheTTL time.Duration
	// CacheSize bounds the cached answers (default 4096: a few per node).
	CacheSize int
}

// NewTokenReviewer returns a TokenReviewer using reviews.
func NewTokenReviewer(reviews authenticationclient.TokenReviewInterface, o ReviewOptions) (*TokenReviewer, error) {
	if o.Namespace == "" || o.ServiceAccount == "" {
		return nil, fmt.Errorf("the driver's namespace and service account are required")
	}
	if o.Audience == "" {
		o.Audience = Audience
	}
	if o.CacheTTL == 0 {
		o.CacheTTL = 10 * time.Second
	}
	if o.CacheSize <= 0 {
		o.CacheSize = 4096
	}
	return &TokenReviewer{
		reviews: reviews, audience: o.Audience, ttl: o.CacheTTL, max: o.CacheSize, now: time.Now,
		username: "system:serviceaccount:" + o.Namespace + ":" + o.ServiceAccount,
		cache:    map[[sha256.Size]byte]cached{},
	}, nil
}

// Authenticate reviews token (or reuses a recent review). Errors never
// quote the token.
func (r *TokenReviewer) Authenticate(ctx context.Context, token string) (issuer.Caller, error) {
	if token == "" {
		return issuer.Caller{}, fmt.Errorf("%w: no bearer token", errUnauthenticated)
	}
	key := sha256.Sum256([]byte(token))
	now := r.now()
	r.mu.Lock()
	c, ok := r.cache[key]
	r.mu.Unlock()
	if ok && now.Before(c.until) {
		return c.caller, c.err
	}
	tr, err := r.reviews.Create(ctx, &authenticationv1.TokenReview{
		Spec: authenticationv1.TokenReviewSpec{Token: token, Audiences: []string{r.audience}},
	}, metav1.CreateOptions{})
	if err != nil { // not cached: the next call asks again
		return issuer.Caller{}, fmt.Errorf("%w: reviewing the caller's token: %v", provider.ErrUnavailable, err)
	}
	caller, err := r.judge(tr.Status)
	r.remember(key, cached{caller: caller, err: err, until: now.Add(r.ttl)})
	return caller, err
}

// judge tells the caller a review's answer names, or why it is refused.
func (r *TokenReviewer) judge(st authenticationv1.TokenReviewStatus) (issuer.Caller, error) {
	if !st.Authenticated {
		return issuer.Caller{}, fmt.Errorf("%w: token not valid for audience %q", errUnauthenticated, r.audience)
	}
	if st.User.Username != r.username {
		return issuer.Caller{}, fmt.Errorf("%w: %s is not the driver's service account %s",
			provider.ErrPermissionDenied, st.User.Username, r.username)
	}
	nodes := st.User.Extra[NodeNameExtra]
	if len(nodes) != 1 || nodes[0] == "" {
		return issuer.Caller{}, fmt.Errorf("%w: the token names no node (a token bound to the driver's pod is required, Kubernetes 1.30 or later with the ServiceAccountTokenPodNodeInfo feature on)",
			provider.ErrPermissionDenied)
	}
	return issuer.Caller{Node: nodes[0]}, nil
}

// remember caches c under key, making room if the cache is full.
func (r *TokenReviewer) remember(key [sha256.Size]byte, c cached) {
	now := r.now()
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.cache) >= r.max {
		for k, v := range r.cache { // expired ones first; else any
			if !now.Before(v.until) {
				delete(r.cache, k)
			}
		}
		for k := range r.cache {
			if len(r.cache) < r.max {
				break
			}
			delete(r.cache, k)
		}
	}
	r.cache[key] = c
}
