// Package aws is the provider for AWS: temporary credentials minted per pod
// with STS (AssumeRoleWithWebIdentity with the pod's own service-account
// token, or AssumeRole with the node's credentials where the admin allows
// it), and Secrets Manager and SSM Parameter Store values, with the
// parameters of aws/secrets-store-csi-driver-provider-aws.
//
// STS sessions cannot be revoked one by one: at unpublish their files go,
// and the audit says the credentials stay valid until their expiry, which
// defaults to the shortest STS allows (15 minutes). A rotation poll
// (rotationPollInterval) reads the secrets again but mints no session
// while the ones the pod holds have time left (carrySessions).
//
// It imports pkg/provider (the contract) and pkg/volumepath (the rule for
// the file names a class asks for), nothing else of ours.
package aws

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/secretsmanager"
	"github.com/aws/aws-sdk-go-v2/service/ssm"
	"github.com/aws/aws-sdk-go-v2/service/sts"
	ststypes "github.com/aws/aws-sdk-go-v2/service/sts/types"
	smithy "github.com/aws/smithy-go"
	smithyhttp "github.com/aws/smithy-go/transport/http"
	"github.com/jmespath/go-jmespath"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// Name is the provider name a SecretProviderClass gives as spec.provider.
const Name = "aws"

// Config is the admin's configuration of the aws provider.
type Config struct {
	// Region for classes that name none.
	Region string `json:"region,omitempty"`
	// Endpoints classes may name instead of AWS's own (private or
	// STS-compatible endpoints). Pods' tokens go to no other place.
	Endpoints []string `json:"endpoints,omitempty"`
	// AllowNodeCredentials lets sts objects assume roles with the node's
	// own credentials (assumeWith: node).
	AllowNodeCredentials bool `json:"allowNodeCredentials,omitempty"`
	// Audience of the pod's service-account token sent to STS (default
	// "sts.amazonaws.com"); a class cannot choose another.
	Audience string `json:"audience,omitempty"`
	// TLS is the trust material of endpoints (keyed by endpoint, one of
	// Endpoints); others are verified against the system's roots.
	TLS map[string]provider.TLS `json:"tls,omitempty"`
}

// DefaultAudience is the audience of the pod's token for STS when the
// admin names none.
const DefaultAudience = "sts.amazonaws.com"

// Provider implements provider.Provider for AWS.
type Provider struct {
	cfg     Config
	clients map[string]*awshttp.BuildableClient // by endpoint, with the admin's TLS
	now     func() time.Time
}

var _ provider.Provider = (*Provider)(nil)

// New returns a provider.
func New(cfg Config) (*Provider, error) {
	for i, e := range cfg.Endpoints {
		if !strings.HasPrefix(e, "https://") && !strings.HasPrefix(e, "http://") {
			return nil, fmt.Errorf("aws: endpoint %q is not an http(s) URL", e)
		}
		cfg.Endpoints[i] = strings.TrimRight(e, "/")
	}
	if cfg.Audience == "" {
		cfg.Audience = DefaultAudience
	}
	clients := map[string]*awshttp.BuildableClient{}
	for e, t := range cfg.TLS {
		e = strings.TrimRight(e, "/")
		if !slices.Contains(cfg.Endpoints, e) {
			return nil, fmt.Errorf("aws: tls: %q is not one of the endpoints", e)
		}
		tc, err := t.Config("aws: tls of " + e)
		if err != nil {
			return nil, err
		}
		clients[e] = awshttp.NewBuildableClient().WithTransportOptions(func(tr *http.Transport) { tr.TLSClientConfig = tc })
	}
	return &Provider{cfg: cfg, clients: clients, now: time.Now}, nil
}

// httpOr is the HTTP client for an endpoint: with the admin's TLS for it,
// or def (the SDK's, verified against the system's roots).
func (p *Provider) httpOr(endpoint *string, def sts.HTTPClient) sts.HTTPClient {
	if endpoint != nil {
		if c, ok := p.clients[*endpoint]; ok {
			return c
		}
	}
	return def
}

func (p *Provider) endpoint(e string) (*string, error) {
	if e == "" {
		return nil, nil
	}
	e = strings.TrimRight(e, "/")
	if !slices.Contains(p.cfg.Endpoints, e) {
		return nil, fmt.Errorf("%w: endpoint %q is not one of the admin's AWS endpoints", provider.ErrPermissionDenied, e)
	}
	return aws.String(e), nil
}

// sessionName says which pod a session is for (at most 64 characters).
func sessionName(req provider.Request) string {
	s := "esc-" + req.LeaseID
	if len(s) > 64 {
		s = s[:64]
	}
	return s
}

// endpoints are the class's endpoints, each checked against the admin's list.
type endpoints struct{ sts, sm, ssm *string }

// check refuses, before any AWS call, everything of a class the admin's
// configuration does not allow: another audience, an endpoint off the
// list, a session from the node's credentials, a missing roleArn or
// token. Nothing is minted for a class that fails any of them.
func (p *Provider) check(c classParams, req provider.Request) (endpoints, string, error) {
	var ep endpoints
	if c.audience != "" && c.audience != p.cfg.Audience {
		return ep, "", fmt.Errorf("%w: %s: the pod's token for STS has the audience the admin configured (%q); a class cannot choose another",
			provider.ErrInvalidParameters, AudienceParam, p.cfg.Audience)
	}
	var err error
	for _, e := range []struct {
		dst **string
		v   string
	}{{&ep.sts, c.stsEndpoint}, {&ep.sm, c.smEndpoint}, {&ep.ssm, c.ssmEndpoint}} {
		if *e.dst, err = p.endpoint(e.v); err != nil {
			return ep, "", err
		}
	}
	needToken := c.hasSecrets()
	for _, o := range c.objects {
		switch {
		case o.ObjectType != TypeSTS:
		case o.AssumeWith == "node" && !p.cfg.AllowNodeCredentials:
			return ep, "", fmt.Errorf("%w: %s: the admin does not allow sessions from the node's credentials", provider.ErrPermissionDenied, o.ObjectName)
		case o.AssumeWith != "node":
			needToken = true
		}
	}
	if c.hasSecrets() && c.roleArn == "" {
		return ep, "", fmt.Errorf("%w: %s is required to read Secrets Manager or SSM", provider.ErrInvalidParameters, RoleArnParam)
	}
	if !needToken {
		return ep, "", nil
	}
	jwt, err := provider.PodToken(req, p.cfg.Audience)
	return ep, jwt, err
}

// Issue mints the class's sts sessions and reads its secrets.
func (p *Provider) Issue(ctx context.Context, req provider.Request) (provider.Lease, error) {
	c, err := parseParams(req.Params, p.cfg.Region)
	if err != nil {
		return provider.Lease{}, err
	}
	ep, jwt, err := p.check(c, req)
	if err != nil {
		return provider.Lease{}, err
	}
	stsEP := ep.sts
	base := aws.Config{Region: c.region, Credentials: aws.AnonymousCredentials{}}
	stsAnon := sts.NewFromConfig(base, func(o *sts.Options) { o.BaseEndpoint, o.HTTPClient = stsEP, p.httpOr(stsEP, o.HTTPClient) })
	start := p.now()
	l := provider.Lease{Values: map[string]string{}, Handle: map[string]string{}, IssuedAt: start, Role: ""}
	versions := map[string]string{}

	// A rotation poll keeps the sessions the lease it replaces holds while
	// they have time left; anything else mints them anew.
	sessions, carried := carrySessions(c, req, start, l.Values)
	if !carried {
		if sessions, err = p.mintSessions(ctx, c, req, stsEP, stsAnon, jwt, start, l.Values); err != nil {
			return provider.Lease{}, err
		}
	}
	for _, o := range c.objects {
		if s, ok := sessions[o.ObjectName]; ok && o.ObjectType == TypeSTS {
			// The lease is as old as its oldest session: the manager renews
			// a carried one where it would have renewed it uncarried.
			if s.IssuedAt.Before(l.IssuedAt) {
				l.IssuedAt = s.IssuedAt
			}
			if !s.ExpiresAt.IsZero() && (l.ExpiresAt.IsZero() || s.ExpiresAt.Before(l.ExpiresAt)) {
				l.ExpiresAt = s.ExpiresAt
			}
			l.Role = o.RoleArn
		}
	}
	if len(sessions) > 0 {
		sj, _ := json.Marshal(sessions)
		l.Handle["sessions"] = string(sj)
	}

	if c.hasSecrets() && l.Role == "" {
		l.Role = c.roleArn
	}
	// A pinned version's value never changes: a re-issue keeps the one the
	// lease it replaces read, and reads the others only.
	toRead := c
	toRead.objects = carryPinned(c.objects, req.Prior, l.Values, versions)
	if toRead.hasSecrets() {
		// Secrets are read as the role the pod's token assumes.
		out, err := stsAnon.AssumeRoleWithWebIdentity(ctx, &sts.AssumeRoleWithWebIdentityInput{
			RoleArn: aws.String(c.roleArn), RoleSessionName: aws.String(sessionName(req)), WebIdentityToken: aws.String(jwt),
			DurationSeconds: aws.Int32(900),
		})
		if err != nil {
			return provider.Lease{}, classifyLogin(err)
		}
		secretCfg := base
		secretCfg.Credentials = credentials.NewStaticCredentialsProvider(
			aws.ToString(out.Credentials.AccessKeyId), aws.ToString(out.Credentials.SecretAccessKey), aws.ToString(out.Credentials.SessionToken))
		if err := p.readSecrets(ctx, toRead, ep, secretCfg, l.Values, versions); err != nil {
			return provider.Lease{}, err
		}
	}
	vj, _ := json.Marshal(versions)
	l.Handle["versions"] = string(vj)
	if c.rotationPoll > 0 && c.hasSecrets() {
		l.RenewAt = start.Add(c.rotationPoll)
	}
	return l, nil
}

// session is what a lease records, in its Handle, of one sts object's
// session: a digest of what it was minted for (specOf), when, and its
// expiry as STS gave it. Nothing of it is secret; Handle is the
// provider's own state, never rendered into the volume nor logged.
type session struct {
	Spec      string    `json:"spec"`
	IssuedAt  time.Time `json:"issuedAt"`
	ExpiresAt time.Time `json:"expiresAt,omitzero"`
}

// specOf digests everything of the class that shapes an sts object's
// session: the object (role, duration, policy, tags, how it is assumed),
// the region and the STS endpoint. A session is carried over only to an
// object of the same digest.
func specOf(o Object, c classParams) string {
	b, _ := json.Marshal(struct {
		Object
		Region, Endpoint string
	}{o, c.region, c.stsEndpoint})
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// carryMargin is how long a carried session must still have to live
// after the next rotation poll: a re-issue failing then has its retries
// before the session ends.
const carryMargin = time.Minute

// mintSessions mints a session for each sts object of c, adds its files
// to values and returns what the lease records of them.
func (p *Provider) mintSessions(ctx context.Context, c classParams, req provider.Request, stsEP *string, stsAnon *sts.Client,
	jwt string, now time.Time, values map[string]string) (map[string]session, error) {
	sessions := map[string]session{}
	for _, o := range c.objects {
		if o.ObjectType != TypeSTS {
			continue
		}
		var creds *ststypes.Credentials
		switch o.AssumeWith {
		case "node":
			nodeCfg, err := config.LoadDefaultConfig(ctx, config.WithRegion(c.region))
			if err != nil {
				return nil, fmt.Errorf("%w: node credentials: %v", provider.ErrUnavailable, err)
			}
			out, err := sts.NewFromConfig(nodeCfg, func(op *sts.Options) { op.BaseEndpoint, op.HTTPClient = stsEP, p.httpOr(stsEP, op.HTTPClient) }).AssumeRole(ctx, &sts.AssumeRoleInput{
				RoleArn: aws.String(o.RoleArn), RoleSessionName: aws.String(sessionName(req)),
				DurationSeconds: aws.Int32(o.DurationSeconds), Policy: optional(o.SessionPolicy), Tags: podTags(req, o.SessionTags),
			})
			if err != nil {
				return nil, classify(err, "AssumeRole")
			}
			creds = out.Credentials
		default:
			out, err := stsAnon.AssumeRoleWithWebIdentity(ctx, &sts.AssumeRoleWithWebIdentityInput{
				RoleArn: aws.String(o.RoleArn), RoleSessionName: aws.String(sessionName(req)), WebIdentityToken: aws.String(jwt),
				DurationSeconds: aws.Int32(o.DurationSeconds), Policy: optional(o.SessionPolicy),
			})
			if err != nil {
				return nil, classifyLogin(err)
			}
			creds = out.Credentials
		}
		if creds == nil || creds.AccessKeyId == nil || creds.SecretAccessKey == nil {
			return nil, fmt.Errorf("%w: STS returned no credentials", provider.ErrUnavailable)
		}
		addCredentialFiles(values, o.ObjectName, creds)
		s := session{Spec: specOf(o, c), IssuedAt: now}
		if creds.Expiration != nil {
			s.ExpiresAt = *creds.Expiration
		}
		sessions[o.ObjectName] = s
	}
	return sessions, nil
}

// carrySessions copies into values the files of every sts object of c
// from prior (req.Prior), the lease a re-issue replaces (nil at a
// publish), and returns what prior recorded of their sessions, when all
// of these hold; it copies nothing and returns false otherwise:
//
//   - the pod did not ask for a new credential (req.Fresh, its lease
//     socket's rotate: whenever it comes, even with the poll due);
//   - the re-issue is the rotation poll prior asked for (its RenewAt has
//     come). The manager re-issues at the earlier of that and its own
//     renewal point of the sessions, which carrying keeps where it was
//     (the lease's IssuedAt is its oldest session's): a re-issue before
//     RenewAt is that renewal, a lapse or a rotation the pod asked for,
//     and mints. (One at RenewAt past the renewal point, a retry late
//     after failures, carries; the manager then finds the new lease's
//     renewal point past and re-issues at once, before its RenewAt: that
//     one mints.)
//   - prior recorded a session for each object, minted for the same
//     object, region and endpoint (specOf), with its three files;
//   - each session, by the expiry STS gave it, outlives the next poll by
//     carryMargin: a session is never carried into its last poll
//     interval, whatever the manager's renewal point.
func carrySessions(c classParams, req provider.Request, now time.Time, values map[string]string) (map[string]session, bool) {
	prior := req.Prior
	if prior == nil || req.Fresh || !c.hasSTS() || prior.RenewAt.IsZero() || now.Before(prior.RenewAt) {
		return nil, false
	}
	var had map[string]session
	if json.Unmarshal([]byte(prior.Handle["sessions"]), &had) != nil {
		return nil, false
	}
	sessions := map[string]session{}
	for _, o := range c.objects {
		if o.ObjectType != TypeSTS {
			continue
		}
		s, ok := had[o.ObjectName]
		if !ok || s.Spec != specOf(o, c) || s.IssuedAt.After(now) || !s.ExpiresAt.After(now.Add(c.rotationPoll+carryMargin)) {
			return nil, false
		}
		for _, f := range sessionFiles(o.ObjectName) {
			if _, ok := prior.Values[f]; !ok {
				return nil, false
			}
		}
		sessions[o.ObjectName] = s
	}
	for name := range sessions {
		for _, f := range sessionFiles(name) {
			values[f] = prior.Values[f]
		}
	}
	return sessions, true
}

// carryPinned copies into values the files of each Secrets Manager or
// SSM object of objects that names a version (objectVersion) and that
// prior (the lease a re-issue replaces; nil at a publish) read: the same
// version recorded, every file of the object present. It records the
// version in versions and returns the objects left: sts sessions, labels
// and the current version (which may have moved), and whatever prior
// lacks.
func carryPinned(objects []Object, prior *provider.Lease, values, versions map[string]string) []Object {
	var had, old map[string]string
	if prior != nil {
		_ = json.Unmarshal([]byte(prior.Handle["versions"]), &had) // none carried if unreadable
		old = prior.Values
	}
	var rest []Object
	for _, o := range objects {
		files := []string{o.fileName()}
		for _, j := range o.JMESPath {
			files = append(files, j.ObjectAlias)
		}
		carried := o.ObjectType != TypeSTS && o.ObjectVersion != "" && had[o.ObjectName] == o.ObjectVersion
		for _, f := range files {
			if _, ok := old[f]; !ok {
				carried = false
			}
		}
		if !carried {
			rest = append(rest, o)
			continue
		}
		for _, f := range files {
			values[f] = old[f]
		}
		versions[o.ObjectName] = o.ObjectVersion
	}
	return rest
}

func optional(s string) *string {
	if s == "" {
		return nil
	}
	return aws.String(s)
}

// podTags tag a node-credential session with the pod it is for.
func podTags(req provider.Request, extra map[string]string) []ststypes.Tag {
	tags := map[string]string{
		"kubernetes-namespace": req.Pod.Namespace, "kubernetes-pod-name": req.Pod.Name,
		"kubernetes-pod-uid": req.Pod.UID, "kubernetes-service-account": req.Pod.ServiceAccount,
	}
	for k, v := range extra {
		tags[k] = v
	}
	keys := make([]string, 0, len(tags))
	for k := range tags {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	out := make([]ststypes.Tag, 0, len(keys))
	for _, k := range keys {
		out = append(out, ststypes.Tag{Key: aws.String(k), Value: aws.String(tags[k])})
	}
	return out
}

// addCredentialFiles writes a session as a shared credentials file, a
// credential_process document and an env file.
func addCredentialFiles(values map[string]string, name string, c *ststypes.Credentials) {
	id, secret, session := aws.ToString(c.AccessKeyId), aws.ToString(c.SecretAccessKey), aws.ToString(c.SessionToken)
	exp := ""
	if c.Expiration != nil {
		exp = c.Expiration.UTC().Format(time.RFC3339)
	}
	values[name] = fmt.Sprintf("[default]\naws_access_key_id = %s\naws_secret_access_key = %s\naws_session_token = %s\n", id, secret, session)
	doc, _ := json.MarshalIndent(map[string]any{
		"Version": 1, "AccessKeyId": id, "SecretAccessKey": secret, "SessionToken": session, "Expiration": exp,
	}, "", "  ")
	values[name+".json"] = string(doc) + "\n"
	values[name+".env"] = fmt.Sprintf("AWS_ACCESS_KEY_ID=%s\nAWS_SECRET_ACCESS_KEY=%s\nAWS_SESSION_TOKEN=%s\n", id, secret, session)
}

// readSecrets reads every Secrets Manager and SSM object, from region and,
// where that fails for a reason other than the secret's, failoverRegion.
func (p *Provider) readSecrets(ctx context.Context, c classParams, ep endpoints, cfg aws.Config, values, versions map[string]string) error {
	smEP, ssmEP := ep.sm, ep.ssm
	var err error
	regions := []string{c.region}
	if c.failoverRegion != "" {
		regions = append(regions, c.failoverRegion)
	}
	for _, o := range c.objects {
		if o.ObjectType == TypeSTS {
			continue
		}
		var val, version string
		for i, region := range regions {
			rc := cfg.Copy()
			rc.Region = region
			if o.ObjectType == TypeSecretsManager {
				val, version, err = getSecret(ctx, secretsmanager.NewFromConfig(rc, func(op *secretsmanager.Options) { op.BaseEndpoint, op.HTTPClient = smEP, p.httpOr(smEP, op.HTTPClient) }), o)
			} else {
				val, version, err = getParameter(ctx, ssm.NewFromConfig(rc, func(op *ssm.Options) { op.BaseEndpoint, op.HTTPClient = ssmEP, p.httpOr(ssmEP, op.HTTPClient) }), o)
			}
			if err == nil || !errors.Is(err, provider.ErrUnavailable) || i == len(regions)-1 {
				break
			}
		}
		if err != nil {
			return err
		}
		values[o.fileName()] = val
		versions[o.ObjectName] = version
		if len(o.JMESPath) > 0 {
			var doc any
			if err := json.Unmarshal([]byte(val), &doc); err != nil {
				return fmt.Errorf("%w: %s: jmesPath needs a JSON secret", provider.ErrInvalidParameters, o.ObjectName)
			}
			for _, j := range o.JMESPath {
				res, err := jmespath.Search(j.Path, doc)
				if err != nil {
					return fmt.Errorf("%w: %s: jmesPath %q: %v", provider.ErrInvalidParameters, o.ObjectName, j.Path, err)
				}
				s, ok := res.(string)
				if !ok {
					return fmt.Errorf("%w: %s: jmesPath %q does not select a string", provider.ErrInvalidParameters, o.ObjectName, j.Path)
				}
				values[j.ObjectAlias] = s
			}
		}
	}
	return nil
}

func getSecret(ctx context.Context, cl *secretsmanager.Client, o Object) (string, string, error) {
	in := &secretsmanager.GetSecretValueInput{SecretId: aws.String(o.ObjectName)}
	if o.ObjectVersion != "" {
		in.VersionId = aws.String(o.ObjectVersion)
	}
	if o.ObjectVersionLabel != "" {
		in.VersionStage = aws.String(o.ObjectVersionLabel)
	}
	out, err := cl.GetSecretValue(ctx, in)
	if err != nil {
		return "", "", classify(err, "GetSecretValue "+o.ObjectName)
	}
	if out.SecretString != nil {
		return *out.SecretString, aws.ToString(out.VersionId), nil
	}
	return string(out.SecretBinary), aws.ToString(out.VersionId), nil
}

func getParameter(ctx context.Context, cl *ssm.Client, o Object) (string, string, error) {
	name := o.ObjectName
	switch {
	case o.ObjectVersion != "":
		name += ":" + o.ObjectVersion
	case o.ObjectVersionLabel != "":
		name += ":" + o.ObjectVersionLabel
	}
	out, err := cl.GetParameter(ctx, &ssm.GetParameterInput{Name: aws.String(name), WithDecryption: aws.Bool(true)})
	if err != nil {
		return "", "", classify(err, "GetParameter "+o.ObjectName)
	}
	if out.Parameter == nil || out.Parameter.Value == nil {
		return "", "", fmt.Errorf("%w: parameter %s has no value", provider.ErrNotFound, o.ObjectName)
	}
	return *out.Parameter.Value, fmt.Sprint(out.Parameter.Version), nil
}

// Renew: STS sessions cannot be extended, and a rotation poll is a fresh
// read; the manager re-issues (the secrets read again but for pinned
// versions, the sessions minted anew but at a poll while they have time
// left: both carried over from the lease replaced) and swaps the files
// only where a value changed.
func (p *Provider) Renew(_ context.Context, l provider.Lease) (provider.Lease, error) {
	return l, provider.ErrNotRenewable
}

// Revoke: secrets need nothing; STS sessions cannot be revoked one by one.
func (p *Provider) Revoke(_ context.Context, l provider.Lease) error {
	c, err := parseParams(l.Params, p.cfg.Region)
	if err != nil {
		return err
	}
	if c.hasSTS() {
		return fmt.Errorf("%w: STS sessions live until their expiry", provider.ErrNotRevocable)
	}
	return nil
}

// classifyLogin classifies an AssumeRoleWithWebIdentity error. Besides the
// codes AWS gives a bad token, STS-compatible servers (MinIO) answer
// InvalidParameterValue for one; the other parameters are the admin's and
// ours, checked before the call, so that answer is about the pod's token.
func classifyLogin(err error) error {
	var ae smithy.APIError
	if errors.As(err, &ae) && ae.ErrorCode() == "InvalidParameterValue" {
		return fmt.Errorf("%w: AssumeRoleWithWebIdentity: %s: %s", provider.ErrPermissionDenied, ae.ErrorCode(), ae.ErrorMessage())
	}
	return classify(err, "AssumeRoleWithWebIdentity")
}

// classify maps an AWS error to the provider's sentinels, with AWS's
// reason (which never holds a key or a token).
func classify(err error, what string) error {
	var ae smithy.APIError
	if errors.As(err, &ae) {
		code, msg := ae.ErrorCode(), ae.ErrorMessage()
		switch {
		case strings.Contains(code, "AccessDenied"), code == "InvalidIdentityToken", code == "ExpiredTokenException",
			code == "IDPRejectedClaim", code == "UnrecognizedClientException", code == "InvalidClientTokenId":
			return fmt.Errorf("%w: %s: %s: %s", provider.ErrPermissionDenied, what, code, msg)
		case code == "ResourceNotFoundException", code == "ParameterNotFound", code == "ParameterVersionNotFound",
			code == "ParameterVersionLabelNotFound":
			return fmt.Errorf("%w: %s: %s: %s", provider.ErrNotFound, what, code, msg)
		case strings.Contains(code, "Throttl"), code == "TooManyRequestsException", code == "RequestLimitExceeded",
			code == "InternalServiceError", code == "InternalFailure", code == "ServiceUnavailable", code == "IDPCommunicationError":
			return fmt.Errorf("%w: %s: %s: %s", provider.ErrUnavailable, what, code, msg)
		}
		var re *smithyhttp.ResponseError
		if errors.As(err, &re) && re.HTTPStatusCode() >= http.StatusInternalServerError {
			return fmt.Errorf("%w: %s: %s: %s", provider.ErrUnavailable, what, code, msg)
		}
		return fmt.Errorf("%s: %s: %s", what, code, msg)
	}
	return fmt.Errorf("%w: %s: %v", provider.ErrUnavailable, what, err)
}
