// Package vaulttest starts a real Vault dev server on 127.0.0.1 for tests
// and sets it up the way an admin would for the driver: a jwt auth method
// that trusts a key the test holds (it signs the pods' service-account
// tokens), a database secrets engine pointed at a real PostgreSQL, and the
// KV engine the dev server mounts at secret/.
package vaulttest

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/golang-jwt/jwt/v5"
	api "github.com/openbao/openbao/api/v2"

	"github.com/ephemeral-secrets/csi-driver/test/harness"
)

// RootToken is the dev server's root token.
const RootToken = "esc-test-root"

// Server is a running Vault dev server.
type Server struct {
	Addr    string // http://127.0.0.1:PORT
	LogFile string
	bin     string
	dir     string
	cmd     *exec.Cmd
	done    chan struct{}
	key     *ecdsa.PrivateKey
}

// Binary finds the vault binary "make vault" builds ($ESC_VAULT overrides).
func Binary() (string, error) {
	if p := os.Getenv("ESC_VAULT"); p != "" {
		return p, nil
	}
	return harness.Tool("vault")
}

// Start starts a dev server on 127.0.0.1 and waits until it answers.
func Start() (*Server, error) { return StartOn("127.0.0.1") }

// StartOn starts a dev server listening on host (a test node's own
// address, for pods to reach).
func StartOn(host string) (*Server, error) {
	bin, err := Binary()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "esc-vault-")
	if err != nil {
		return nil, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	ports, err := harness.FreePorts(1)
	if err != nil {
		return nil, err
	}
	s := &Server{Addr: "http://" + net.JoinHostPort(host, strconv.Itoa(ports[0])), LogFile: filepath.Join(dir, "vault.log"), bin: bin, dir: dir, key: key}
	if err := s.Restart(); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

// Restart starts the server again after Stop. A dev server keeps nothing:
// callers set it up again.
func (s *Server) Restart() error {
	log, err := os.OpenFile(s.LogFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer log.Close()
	s.cmd = exec.Command(s.bin, "server", "-dev", "-dev-root-token-id="+RootToken,
		"-dev-listen-address="+s.Addr[len("http://"):], "-dev-no-store-token")
	s.cmd.Env = append(os.Environ(), "HOME="+s.dir, "VAULT_LOG_LEVEL=info")
	s.cmd.Stdout, s.cmd.Stderr = log, log
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := s.cmd.Start(); err != nil {
		return err
	}
	s.done = make(chan struct{})
	go func(c *exec.Cmd, d chan struct{}) { _ = c.Wait(); close(d) }(s.cmd, s.done)
	cl, err := s.Client()
	if err != nil {
		return err
	}
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if h, err := cl.Sys().Health(); err == nil && h.Initialized && !h.Sealed {
			return nil
		}
		select {
		case <-s.done:
			out, _ := os.ReadFile(s.LogFile)
			return fmt.Errorf("vault exited: %s", out)
		case <-time.After(100 * time.Millisecond):
		}
	}
	return fmt.Errorf("vault not ready in 30s")
}

// Stop stops the server (it forgets everything).
func (s *Server) Stop() {
	if s.cmd == nil || s.cmd.Process == nil {
		return
	}
	_ = s.cmd.Process.Signal(syscall.SIGCONT)
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.done:
	case <-time.After(15 * time.Second):
		_ = s.cmd.Process.Kill()
		<-s.done
	}
	s.cmd = nil
}

// Pause freezes the server (SIGSTOP): it keeps its state but answers
// nothing, as a server behind a network outage; Resume thaws it.
func (s *Server) Pause() error { return s.cmd.Process.Signal(syscall.SIGSTOP) }

// Resume undoes Pause.
func (s *Server) Resume() error { return s.cmd.Process.Signal(syscall.SIGCONT) }

// Close stops the server and removes its files.
func (s *Server) Close() {
	s.Stop()
	_ = os.RemoveAll(s.dir)
}

// Client is a root client.
func (s *Server) Client() (*api.Client, error) {
	cfg := api.DefaultConfig()
	cfg.Address = s.Addr
	cl, err := api.NewClient(cfg)
	if err != nil {
		return nil, err
	}
	cl.SetToken(RootToken)
	return cl, nil
}

// Setup configures jwt auth (role "app" for system:serviceaccount:NS:SA
// with audience "vault"), the database engine (role "app" on pgURL, with
// the given TTLs) and a KV secret at secret/app.
func (s *Server) Setup(ctx context.Context, pgURL, ns, sa string, ttl, maxTTL time.Duration) error {
	cl, err := s.Client()
	if err != nil {
		return err
	}
	pub, err := x509.MarshalPKIXPublicKey(&s.key.PublicKey)
	if err != nil {
		return err
	}
	pubPEM := string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub}))
	steps := []struct {
		path string
		data map[string]any
	}{
		{"sys/auth/jwt", map[string]any{"type": "jwt"}},
		{"auth/jwt/config", map[string]any{"jwt_validation_pubkeys": []string{pubPEM}}},
		{"sys/policies/acl/app", map[string]any{"policy": `
path "database/creds/app" { capabilities = ["read"] }
path "secret/data/app" { capabilities = ["read"] }
`}},
		{"auth/jwt/role/app", map[string]any{
			"role_type": "jwt", "bound_audiences": []string{"vault"}, "user_claim": "sub",
			"bound_subject": "system:serviceaccount:" + ns + ":" + sa, "token_policies": []string{"app"},
			"token_ttl": "1h", "token_max_ttl": "2h",
		}},
		{"sys/mounts/database", map[string]any{"type": "database"}},
		{"database/config/pg", map[string]any{
			"plugin_name": "postgresql-database-plugin", "connection_url": pgURL, "allowed_roles": "*",
			"verify_connection": true,
		}},
		{"database/roles/app", map[string]any{
			"db_name": "pg",
			"creation_statements": []string{
				`CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';`,
				`GRANT SELECT ON public.items TO "{{name}}";`,
			},
			"default_ttl": int(ttl.Seconds()), "max_ttl": int(maxTTL.Seconds()),
		}},
		{"secret/data/app", map[string]any{"data": map[string]any{"api-key": "kv-api-key-" + strconv.FormatInt(time.Now().UnixNano(), 36), "region": "eu-west-1"}}},
	}
	for _, st := range steps {
		if _, err := cl.Logical().WriteWithContext(ctx, st.path, st.data); err != nil {
			return fmt.Errorf("%s: %w", st.path, err)
		}
	}
	return nil
}

// SetupKubernetesAuth enables the kubernetes auth method against a real
// API server: Vault checks pods' tokens with TokenReview, as reviewerJWT
// (a service account bound to system:auth-delegator). Role "k8s-app" is
// for service account sa of namespace ns, audience "vault", and may read
// secret/data/app.
func (s *Server) SetupKubernetesAuth(ctx context.Context, host string, caPEM []byte, reviewerJWT, ns, sa string) error {
	cl, err := s.Client()
	if err != nil {
		return err
	}
	for _, st := range []struct {
		path string
		data map[string]any
	}{
		{"sys/auth/kubernetes", map[string]any{"type": "kubernetes"}},
		{"auth/kubernetes/config", map[string]any{
			"kubernetes_host": host, "kubernetes_ca_cert": string(caPEM), "token_reviewer_jwt": reviewerJWT,
			"disable_local_ca_jwt": true,
		}},
		{"sys/policies/acl/k8s-app", map[string]any{"policy": `path "secret/data/app" { capabilities = ["read"] }`}},
		{"auth/kubernetes/role/k8s-app", map[string]any{
			"bound_service_account_names": []string{sa}, "bound_service_account_namespaces": []string{ns},
			"audience": "vault", "token_policies": []string{"k8s-app"}, "token_ttl": "1h",
		}},
	} {
		if _, err := cl.Logical().WriteWithContext(ctx, st.path, st.data); err != nil {
			return fmt.Errorf("%s: %w", st.path, err)
		}
	}
	return nil
}

// Token signs a service-account token as the cluster would issue it, for
// the pod's namespace and service account, with the given audience.
func (s *Server) Token(ns, sa, audience string) (string, error) {
	now := time.Now()
	t := jwt.NewWithClaims(jwt.SigningMethodES256, jwt.MapClaims{
		"iss": "https://kubernetes.default.svc", "sub": "system:serviceaccount:" + ns + ":" + sa,
		"aud": []string{audience}, "iat": now.Unix(), "nbf": now.Unix(), "exp": now.Add(time.Hour).Unix(),
	})
	return t.SignedString(s.key)
}
