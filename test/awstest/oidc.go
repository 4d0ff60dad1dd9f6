// Package awstest gives the aws provider's tests real peers where they can
// run here: an OpenID Connect issuer (discovery document and JWKS on
// 127.0.0.1, signing the pods' service-account tokens as a cluster would),
// a MinIO server whose STS trusts it, and, for Secrets Manager and SSM,
// which nothing here implements, an httptest server that speaks their JSON
// protocol so that the real SDK clients, retries included, talk to it.
package awstest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// OIDC is an OpenID Connect issuer on 127.0.0.1.
type OIDC struct {
	srv *httptest.Server
	key *ecdsa.PrivateKey
}

// StartOIDC serves /.well-known/openid-configuration and /keys.
func StartOIDC() (*OIDC, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	o := &OIDC{key: key}
	mux := http.NewServeMux()
	mux.HandleFunc("/.well-known/openid-configuration", func(w http.ResponseWriter, _ *http.Request) {
		_ = json.NewEncoder(w).Encode(map[string]any{
			"issuer": o.Issuer(), "jwks_uri": o.Issuer() + "/keys",
			"response_types_supported": []string{"id_token"}, "subject_types_supported": []string{"public"},
			"id_token_signing_alg_values_supported": []string{"ES256"},
		})
	})
	mux.HandleFunc("/keys", func(w http.ResponseWriter, _ *http.Request) {
		b64 := base64.RawURLEncoding.EncodeToString
		pt, err := key.PublicKey.Bytes() // 0x04 || X || Y, 32 bytes each on P-256
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		_ = json.NewEncoder(w).Encode(map[string]any{"keys": []map[string]string{{
			"kty": "EC", "crv": "P-256", "kid": "esc-test", "alg": "ES256", "use": "sig",
			"x": b64(pt[1:33]), "y": b64(pt[33:65]),
		}}})
	})
	o.srv = httptest.NewUnstartedServer(mux) // its handlers read o.srv: set it before serving
	o.srv.Start()
	return o, nil
}

// Issuer is the issuer URL.
func (o *OIDC) Issuer() string { return o.srv.URL }

// ConfigURL is the discovery document's URL.
func (o *OIDC) ConfigURL() string { return o.srv.URL + "/.well-known/openid-configuration" }

// Token signs a service-account token for ns/sa with one audience.
func (o *OIDC) Token(ns, sa, audience string) (string, error) {
	now := time.Now()
	t := jwt.NewWithClaims(jwt.SigningMethodES256, jwt.MapClaims{
		"iss": o.Issuer(), "sub": "system:serviceaccount:" + ns + ":" + sa, "aud": []string{audience},
		"iat": now.Unix(), "nbf": now.Unix(), "exp": now.Add(time.Hour).Unix(),
	})
	t.Header["kid"] = "esc-test"
	return t.SignedString(o.key)
}

// Close stops the issuer.
func (o *OIDC) Close() { o.srv.Close() }
