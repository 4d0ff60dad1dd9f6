package provider

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// MaxTrustFileBytes bounds each file of the admin's trust material: a CA
// bundle, a client certificate or key is a few KiB; a device or a huge
// file named by mistake must not exhaust the driver's memory.
const MaxTrustFileBytes = 1 << 20

// TLS is the admin's trust material for a backend address: which CAs
// vouch for it, the client certificate the driver presents, the name its
// certificate must carry, and whether verification is off. It lives only
// in the admin's backend configuration: classes cannot name files or turn
// verification off.
type TLS struct {
	// CACert is a PEM file of the CAs that sign the backend's certificate;
	// empty: the system's roots.
	CACert string `json:"caCert,omitempty"`
	// ClientCert is a PEM file of the certificate the driver presents
	// (mutual TLS); with ClientKey, or neither.
	ClientCert string `json:"clientCert,omitempty"`
	// ClientKey is the PEM file of ClientCert's private key.
	ClientKey string `json:"clientKey,omitempty"`
	// ServerName is the name the backend's certificate must carry, when it
	// is not the address's host.
	ServerName string `json:"serverName,omitempty"`
	// InsecureSkipVerify turns verification off for this address. Only the
	// admin can set it, and pods' tokens then go to whoever answers there.
	InsecureSkipVerify bool `json:"insecureSkipVerify,omitempty"`
}

// Config reads the trust files (each at most MaxTrustFileBytes) and
// returns the client TLS configuration. what names the setting in errors,
// which never quote a file's content.
func (t TLS) Config(what string) (*tls.Config, error) {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: t.ServerName, InsecureSkipVerify: t.InsecureSkipVerify} //nolint:gosec // the admin's choice, documented
	if t.CACert != "" {
		pem, err := ReadTrustFile(t.CACert)
		if err != nil {
			return nil, fmt.Errorf("%s: caCert: %w", what, err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("%s: caCert holds no PEM certificate", what)
		}
		cfg.RootCAs = pool
	}
	if (t.ClientCert == "") != (t.ClientKey == "") {
		return nil, fmt.Errorf("%s: clientCert and clientKey go together", what)
	}
	if t.ClientCert != "" {
		certPEM, err := ReadTrustFile(t.ClientCert)
		if err != nil {
			return nil, fmt.Errorf("%s: clientCert: %w", what, err)
		}
		keyPEM, err := ReadTrustFile(t.ClientKey)
		if err != nil {
			return nil, fmt.Errorf("%s: clientKey: %w", what, err)
		}
		pair, err := tls.X509KeyPair(certPEM, keyPEM)
		if err != nil {
			// X509KeyPair's messages do not quote the key; still, say less.
			return nil, fmt.Errorf("%s: clientCert and clientKey are not a PEM certificate and its key", what)
		}
		cfg.Certificates = []tls.Certificate{pair}
	}
	return cfg, nil
}

// ErrTrustFile is returned for a trust file that is not a regular file or
// is larger than MaxTrustFileBytes.
var ErrTrustFile = errors.New("not a regular file of at most 1 MiB")

// ReadTrustFile reads one file of the admin's trust material: a regular
// file (after symbolic links, as a mounted Secret has them) of at most
// MaxTrustFileBytes. It never blocks on a FIFO and never reads a device.
func ReadTrustFile(path string) ([]byte, error) {
	// O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		var pe *os.PathError
		if errors.As(err, &pe) {
			return nil, pe.Err // the path is the caller's to name
		}
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() || st.Size() > MaxTrustFileBytes {
		return nil, ErrTrustFile
	}
	b, err := io.ReadAll(io.LimitReader(f, MaxTrustFileBytes+1))
	if err != nil {
		return nil, err
	}
	if len(b) > MaxTrustFileBytes {
		return nil, ErrTrustFile // grew while read
	}
	return b, nil
}
