package awstest

import (
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"syscall"
	"time"

	"github.com/ephemeral-secrets/csi-driver/test/harness"
)

// MinIO root credentials of the test server.
const (
	RootUser     = "esc-minio-root"
	RootPassword = "esc-minio-root-password"
)

// MinIO is a MinIO server whose STS trusts an OIDC issuer and gives every
// web identity the built-in "readonly" policy.
type MinIO struct {
	URL     string
	RoleARN string // what AssumeRoleWithWebIdentity must name
	LogFile string
	dir     string
	cmd     *exec.Cmd
}

var roleARN = regexp.MustCompile(`arn:minio:iam:::role/[A-Za-z0-9_-]+`)

// StartMinIO starts MinIO with its OpenID identity provider set to issuer.
func StartMinIO(oidcConfigURL string) (*MinIO, error) { return StartMinIOTrusting(oidcConfigURL, nil) }

// StartMinIOTrusting is StartMinIO for an issuer served over TLS by a CA
// MinIO must trust (a kube-apiserver's).
func StartMinIOTrusting(oidcConfigURL string, caPEM []byte) (*MinIO, error) {
	bin, err := harness.Tool("minio")
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "esc-minio-")
	if err != nil {
		return nil, err
	}
	ports, err := harness.FreePorts(2)
	if err != nil {
		return nil, err
	}
	m := &MinIO{URL: "http://127.0.0.1:" + strconv.Itoa(ports[0]), LogFile: filepath.Join(dir, "minio.log"), dir: dir}
	log, err := os.Create(m.LogFile)
	if err != nil {
		return nil, err
	}
	defer log.Close()
	certs := filepath.Join(dir, "certs")
	if err := os.MkdirAll(filepath.Join(certs, "CAs"), 0o700); err != nil {
		return nil, err
	}
	if caPEM != nil {
		if err := os.WriteFile(filepath.Join(certs, "CAs", "issuer-ca.crt"), caPEM, 0o600); err != nil {
			return nil, err
		}
	}
	m.cmd = exec.Command(bin, "server", "--address", "127.0.0.1:"+strconv.Itoa(ports[0]),
		"--console-address", "127.0.0.1:"+strconv.Itoa(ports[1]), "--certs-dir", certs, filepath.Join(dir, "data"))
	m.cmd.Env = append(os.Environ(),
		"MINIO_ROOT_USER="+RootUser, "MINIO_ROOT_PASSWORD="+RootPassword, "MINIO_BROWSER=off",
		"MINIO_IDENTITY_OPENID_CONFIG_URL="+oidcConfigURL,
		"MINIO_IDENTITY_OPENID_CLIENT_ID=sts.amazonaws.com",
		"MINIO_IDENTITY_OPENID_ROLE_POLICY=readonly",
		"MINIO_UPDATE=off", "HOME="+dir)
	m.cmd.Stdout, m.cmd.Stderr = log, log
	m.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := m.cmd.Start(); err != nil {
		return nil, err
	}
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		resp, err := http.Get(m.URL + "/minio/health/ready")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				out, _ := os.ReadFile(m.LogFile)
				if arn := roleARN.Find(out); arn != nil {
					m.RoleARN = string(arn)
					return m, nil
				}
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
	out, _ := os.ReadFile(m.LogFile)
	m.Close()
	return nil, fmt.Errorf("minio not ready, or no role ARN in its log: %s", out)
}

// Close stops MinIO and removes its files.
func (m *MinIO) Close() {
	if m.cmd != nil && m.cmd.Process != nil {
		_ = m.cmd.Process.Kill()
		_ = m.cmd.Wait()
	}
	_ = os.RemoveAll(m.dir)
}
