package aws

import (
	"context"
	"errors"
	"testing"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/test/standin"
)

// Every check of a class runs before the first AWS call: a class that
// fails one mints no STS session at the (allowed) STS endpoint, which a
// local listener standing in for STS would record.
func TestChecksBeforeAnySession(t *testing.T) {
	sts := standin.New(t, false)
	calls := func() int { _, r, _ := sts.Seen(); return r }
	p, err := New(Config{Region: "us-east-1", Endpoints: []string{sts.URL}})
	if err != nil {
		t.Fatal(err)
	}
	sessionAndSecret := "- {objectName: s, objectType: sts}\n- {objectName: db, objectType: secretsmanager}"
	pod := provider.Pod{Namespace: "team-a", Name: "p", UID: "u", ServiceAccount: "sa"}
	tokens := map[string]provider.Token{"sts.amazonaws.com": {Token: standin.Token("team-a", "sa", "u", "sts.amazonaws.com")},
		"vault": {Token: standin.Token("team-a", "sa", "u", "vault")}}
	for _, tc := range []struct {
		name   string
		params map[string]string
		tokens map[string]provider.Token
		want   error
	}{
		{"secrets manager endpoint off the list", map[string]string{SMEndpointParam: "http://127.0.0.1:1"}, tokens, provider.ErrPermissionDenied},
		{"ssm endpoint off the list", map[string]string{SSMEndpointParam: "http://127.0.0.1:1"}, tokens, provider.ErrPermissionDenied},
		{"sts endpoint off the list", map[string]string{STSEndpointParam: "http://127.0.0.1:1"}, tokens, provider.ErrPermissionDenied},
		{"another audience", map[string]string{AudienceParam: "vault"}, tokens, provider.ErrInvalidParameters},
		{"node credentials not allowed", map[string]string{ObjectsParam: "- {objectName: s, objectType: sts, assumeWith: node}\n- {objectName: t, objectType: sts}"}, tokens, provider.ErrPermissionDenied},
		{"secrets without roleArn", map[string]string{RoleArnParam: ""}, tokens, provider.ErrInvalidParameters},
		{"no token for the admin's audience", nil, map[string]provider.Token{"vault": tokens["vault"]}, provider.ErrPermissionDenied},
		{"a token of another service account", nil, map[string]provider.Token{"sts.amazonaws.com": {Token: standin.Token("team-a", "admin", "u", "sts.amazonaws.com")}}, provider.ErrPermissionDenied},
	} {
		t.Run(tc.name, func(t *testing.T) {
			params := map[string]string{RoleArnParam: "arn:aws:iam::1:role/r", STSEndpointParam: sts.URL, ObjectsParam: sessionAndSecret}
			for k, v := range tc.params {
				params[k] = v
			}
			if params[RoleArnParam] == "" {
				delete(params, RoleArnParam)
				params[ObjectsParam] = "- {objectName: db, objectType: secretsmanager}"
			}
			_, err := p.Issue(context.Background(), provider.Request{LeaseID: "l", Params: params, Tokens: tc.tokens,
				Pod: pod})
			if !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
			if n := calls(); n != 0 {
				t.Fatalf("%d calls to STS before the refusal", n)
			}
		})
	}
	// The same class with everything allowed does reach STS: the listener
	// can see a call.
	_, err = p.Issue(context.Background(), provider.Request{LeaseID: "l", Tokens: tokens, Pod: pod, Params: map[string]string{
		RoleArnParam: "arn:aws:iam::1:role/r", STSEndpointParam: sts.URL, ObjectsParam: sessionAndSecret}})
	if !errors.Is(err, provider.ErrPermissionDenied) || calls() == 0 {
		t.Fatalf("an allowed class: %v after %d calls, want STS's refusal", err, calls())
	}
}

// An endpoint's TLS is the admin's: without the admin's CA for it, the
// pod's token is not sent to a server nobody vouches for; with it, it is.
func TestEndpointTrustIsTheAdmins(t *testing.T) {
	srv := standin.New(t, true)
	calls := func() int { _, r, _ := srv.Seen(); return r }
	ca := srv.CAFile
	req := provider.Request{LeaseID: "l", Pod: provider.Pod{Namespace: "team-a", Name: "p", UID: "u", ServiceAccount: "sa"},
		Tokens: map[string]provider.Token{"sts.amazonaws.com": {Token: standin.Token("team-a", "sa", "u", "sts.amazonaws.com")}},
		Params: map[string]string{STSEndpointParam: srv.URL, ObjectsParam: "- {objectName: s, objectType: sts, roleArn: 'arn:aws:iam::1:role/r'}"}}

	unverified, err := New(Config{Region: "us-east-1", Endpoints: []string{srv.URL}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := unverified.Issue(context.Background(), req); err == nil || calls() != 0 {
		t.Fatalf("an endpoint nobody vouches for: %v after %d requests", err, calls())
	}
	trusted, err := New(Config{Region: "us-east-1", Endpoints: []string{srv.URL}, TLS: map[string]provider.TLS{srv.URL: {CACert: ca}}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := trusted.Issue(context.Background(), req); err == nil || calls() == 0 {
		t.Fatalf("the admin's CA: %v after %d requests", err, calls())
	}
	if _, err := New(Config{Endpoints: []string{srv.URL}, TLS: map[string]provider.TLS{"https://elsewhere": {}}}); err == nil {
		t.Error("TLS for an endpoint not on the list accepted")
	}
}
