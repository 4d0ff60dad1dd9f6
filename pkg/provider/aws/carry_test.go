package aws

import (
	"context"
	"fmt"
	"maps"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/test/awstest"
)

// awsPeers are the real STS (MinIO's, trusting a local OIDC issuer)
// behind a call counter, and the Secrets Manager server.
type awsPeers struct {
	oidc    *awstest.OIDC
	minio   *awstest.MinIO
	sts     *awstest.STSCounter
	secrets *awstest.Secrets
}

func startPeers(t *testing.T) *awsPeers {
	t.Helper()
	var e awsPeers
	var err error
	if e.oidc, err = awstest.StartOIDC(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.oidc.Close)
	if e.minio, err = awstest.StartMinIO(e.oidc.ConfigURL()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.minio.Close)
	if e.sts, err = awstest.StartSTSCounter(e.minio.URL); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.sts.Close)
	e.secrets = awstest.StartSecrets()
	t.Cleanup(e.secrets.Close)
	return &e
}

// A rotation poll re-issues the whole lease: it reads the secrets again,
// with the pod's token, but mints no session while the prior lease's
// sessions have time left; it carries them over byte for byte, with
// their expiry and the lease's issue time (the manager's renewal point of
// them stays where it was). Everything else mints: a publish, a re-issue
// before the poll is due (the manager's own renewal, a rotation the pod
// asked for), a rotation the pod asked for when the poll is due (Fresh:
// the pod wants a new credential), a session near its end, a class whose
// session differs, a prior lease that recorded no session.
func TestPollCarriesSessionsOverUntilNearTheirEnd(t *testing.T) {
	e := startPeers(t)
	e.secrets.PutSecret("prod/db", "db-password-v1")
	// The node's own credentials (assumeWith: node): MinIO's root user.
	home := t.TempDir()
	t.Setenv("AWS_ACCESS_KEY_ID", awstest.RootUser)
	t.Setenv("AWS_SECRET_ACCESS_KEY", awstest.RootPassword)
	t.Setenv("AWS_CONFIG_FILE", filepath.Join(home, "config"))
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", filepath.Join(home, "credentials"))
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")

	now := time.Now()
	p, err := New(Config{Region: "us-east-1", Endpoints: []string{e.sts.URL, e.secrets.URL()}, AllowNodeCredentials: true})
	if err != nil {
		t.Fatal(err)
	}
	p.now = func() time.Time { return now }
	tok, err := e.oidc.Token("team-a", "app", DefaultAudience)
	if err != nil {
		t.Fatal(err)
	}
	// Sessions of 1800 s and 2400 s, the reading role's of 900 s: the
	// counter tells them apart.
	objects := func(duration int) string {
		return fmt.Sprintf(`
- {objectName: aws, objectType: sts, durationSeconds: %d}
- {objectName: nodeaws, objectType: sts, durationSeconds: 2400, assumeWith: node}
- {objectName: prod/db, objectType: secretsmanager, objectAlias: db}`, duration)
	}
	params := map[string]string{
		RegionParam: "us-east-1", RoleArnParam: e.minio.RoleARN, STSEndpointParam: e.sts.URL,
		SMEndpointParam: e.secrets.URL(), RotationPollParam: "2m", ObjectsParam: objects(1800),
	}
	issue := func(t *testing.T, id string, params map[string]string, prior *provider.Lease, fresh bool) provider.Lease {
		t.Helper()
		l, err := p.Issue(context.Background(), provider.Request{LeaseID: id, Params: params, Prior: prior, Fresh: fresh,
			Pod:    provider.Pod{Namespace: "team-a", Name: "p", UID: "u", ServiceAccount: "app"},
			Tokens: map[string]provider.Token{DefaultAudience: {Token: tok}}})
		if err != nil {
			t.Fatalf("issue: %v", err)
		}
		return l
	}
	type counts struct{ web, node, reads int }
	seen := func() counts {
		return counts{e.sts.Calls("AssumeRoleWithWebIdentity", "1800"), e.sts.Calls("AssumeRole", "2400"),
			e.sts.Calls("AssumeRoleWithWebIdentity", "900")}
	}
	sessionFilesOf := func(l provider.Lease) map[string]string {
		out := map[string]string{}
		for _, n := range append(sessionFiles("aws"), sessionFiles("nodeaws")...) {
			out[n] = l.Values[n]
		}
		return out
	}

	before := seen()
	first := issue(t, "publish", params, nil, false)
	if got := seen(); got != (counts{before.web + 1, before.node + 1, before.reads + 1}) {
		t.Fatalf("a publish: calls %+v after %+v, want a session of each kind and a read", got, before)
	}
	if first.Values["db"] != "db-password-v1" || !strings.Contains(first.Values["aws"], "aws_session_token") ||
		!strings.Contains(first.Values["nodeaws"], "aws_session_token") {
		t.Fatalf("a publish wrote no session or secret")
	}
	if first.ExpiresAt.IsZero() || first.RenewAt != now.Add(2*time.Minute) {
		t.Fatalf("a publish: expires %v, renew at %v", first.ExpiresAt, first.RenewAt)
	}
	for _, env := range []string{"aws.env", "nodeaws.env"} {
		for _, line := range strings.Split(strings.TrimSpace(first.Values[env]), "\n") {
			_, secret, _ := strings.Cut(line, "=")
			for k, h := range first.Handle {
				if secret == "" || strings.Contains(h, secret) {
					t.Fatalf("the handle's %s holds a part of %s", k, env)
				}
			}
		}
	}

	// Polls, each when the one before asked for it, the secret changing
	// between two: sessions carried over, the secret read every time.
	prior := first
	for i, value := range []string{"db-password-v1", "db-password-v2", "db-password-v2"} {
		if i == 1 {
			e.secrets.PutSecret("prod/db", value)
		}
		now = prior.RenewAt.Add(time.Second)
		before := seen()
		next := issue(t, fmt.Sprintf("poll-%d", i), params, &prior, false)
		if got := seen(); got != (counts{before.web, before.node, before.reads + 1}) {
			t.Errorf("poll %d: calls %+v after %+v, want one read and no session", i, got, before)
		}
		if !maps.Equal(sessionFilesOf(next), sessionFilesOf(first)) {
			t.Errorf("poll %d: the session files changed", i)
		}
		if next.Values["db"] != value {
			t.Errorf("poll %d: the secret is %q, want %q", i, next.Values["db"], value)
		}
		if !next.ExpiresAt.Equal(first.ExpiresAt) || !next.IssuedAt.Equal(first.IssuedAt) || next.RenewAt != now.Add(2*time.Minute) {
			t.Errorf("poll %d: issued %v expires %v renew at %v, want the sessions' %v and %v, and the next poll",
				i, next.IssuedAt, next.ExpiresAt, next.RenewAt, first.IssuedAt, first.ExpiresAt)
		}
		prior = next
	}

	// Everything that must mint both sessions anew.
	noSessions := prior
	noSessions.Handle = maps.Clone(prior.Handle)
	delete(noSessions.Handle, "sessions")
	otherDuration := maps.Clone(params)
	otherDuration[ObjectsParam] = objects(3600)
	for _, tc := range []struct {
		name   string
		at     time.Time
		params map[string]string
		prior  *provider.Lease
		fresh  bool
	}{
		{"a publish", prior.RenewAt, params, nil, false},
		{"a re-issue before the poll is due", prior.RenewAt.Add(-time.Second), params, &prior, false},
		{"a rotation the pod asked for when the poll is due", prior.RenewAt.Add(time.Second), params, &prior, true},
		{"a poll with less than the next poll and a minute left", first.ExpiresAt.Add(-3 * time.Minute), params, &prior, false},
		{"a poll after the sessions lapsed", first.ExpiresAt.Add(time.Minute), params, &prior, false},
		{"a poll for a class whose session differs", prior.RenewAt, otherDuration, &prior, false},
		{"a poll of a lease that recorded no session", prior.RenewAt, params, &noSessions, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			now = tc.at
			before := seen()
			l := issue(t, "reissue", tc.params, tc.prior, tc.fresh)
			got := seen()
			if got.node != before.node+1 || got.web+e.sts.Calls("AssumeRoleWithWebIdentity", "3600") <= before.web {
				t.Errorf("calls %+v after %+v, want both sessions minted", got, before)
			}
			for name, v := range sessionFilesOf(l) {
				if v == first.Values[name] {
					t.Errorf("%s carried over", name)
				}
			}
			if !l.IssuedAt.Equal(tc.at) {
				t.Errorf("issued at %v, want %v", l.IssuedAt, tc.at)
			}
		})
	}
}
