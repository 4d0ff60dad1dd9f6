package remote

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"slices"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/klog/v2"

	"github.com/ephemeral-secrets/csi-driver/pkg/issuer/remote/wire"
)

// Keys of the serving Secret and of the roots ConfigMap.
const (
	CAKey      = wire.CAKey
	caKeyKey   = "ca.key"
	CertKey    = corev1.TLSCertKey
	PrivateKey = corev1.TLSPrivateKeyKey
)

// CertOptions say where the issuer's serving certificate lives.
type CertOptions struct {
	Namespace string
	// Secret holds the signer (ca.crt, ca.key) and the serving
	// certificate (tls.crt, tls.key); only the issuer reads it.
	Secret string
	// ConfigMap publishes ca.crt for node plugins.
	ConfigMap string
	// DNSNames the serving certificate is valid for (the Service's).
	DNSNames []string
	// Validity of a serving certificate (default 90 days); it is renewed
	// when a third of it is left. The signer lives 10 years; it is replaced
	// when it has less than two certificates' validity left.
	Validity time.Duration
}

const caValidity = 10 * 365 * 24 * time.Hour

// Certs keeps the issuer's serving certificate: it makes the signer and
// the certificate if the Secret has none (the first replica to create it
// wins; the others read it), renews the certificate before it expires,
// publishes the signer in the ConfigMap, and serves whatever the Secret
// holds now (so both replicas serve the same certificate).
type Certs struct {
	cs   kubernetes.Interface
	o    CertOptions
	now  func() time.Time
	cert atomic.Pointer[tls.Certificate]
}

// NewCerts returns Certs for o.
func NewCerts(cs kubernetes.Interface, o CertOptions) (*Certs, error) {
	if o.Namespace == "" || o.Secret == "" || o.ConfigMap == "" || len(o.DNSNames) == 0 {
		return nil, errors.New("serving certificate: namespace, Secret, ConfigMap and DNS names are required")
	}
	if o.Validity <= 0 {
		o.Validity = 90 * 24 * time.Hour
	}
	return &Certs{cs: cs, o: o, now: time.Now}, nil
}

// GetCertificate serves the current certificate (tls.Config).
func (c *Certs) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	if cert := c.cert.Load(); cert != nil {
		return cert, nil
	}
	return nil, errors.New("no serving certificate yet")
}

// Ready tells whether a certificate is loaded.
func (c *Certs) Ready() bool { return c.cert.Load() != nil }

// Run ensures the certificate now and then every interval until ctx is
// done; it returns the first attempt's error.
func (c *Certs) Run(ctx context.Context, interval time.Duration) error {
	if err := c.Ensure(ctx); err != nil {
		return err
	}
	go func() {
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				if err := c.Ensure(ctx); err != nil {
					klog.ErrorS(err, "Keeping the issuer's serving certificate")
				}
			}
		}
	}()
	return nil
}

// Ensure makes the Secret hold a signer and a certificate for the DNS
// names that is not due for renewal, publishes the signer, and loads the
// certificate to serve.
func (c *Certs) Ensure(ctx context.Context) error {
	secrets := c.cs.CoreV1().Secrets(c.o.Namespace)
	for range 5 {
		s, err := secrets.Get(ctx, c.o.Secret, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			s = &corev1.Secret{
				ObjectMeta: metav1.ObjectMeta{Name: c.o.Secret, Namespace: c.o.Namespace},
				Type:       corev1.SecretTypeTLS,
			}
			if s.Data, err = c.fresh(nil); err != nil {
				return err
			}
			if _, err = secrets.Create(ctx, s, metav1.CreateOptions{}); apierrors.IsAlreadyExists(err) {
				continue // another replica made it: serve that one
			} else if err != nil {
				return fmt.Errorf("creating Secret %s/%s: %w", c.o.Namespace, c.o.Secret, err)
			}
			klog.InfoS("Created the issuer's signer and serving certificate", "secret", c.o.Secret)
		} else if err != nil {
			return fmt.Errorf("reading Secret %s/%s: %w", c.o.Namespace, c.o.Secret, err)
		} else if c.due(s.Data) {
			if s.Data, err = c.fresh(s.Data); err != nil {
				return err
			}
			if _, err = secrets.Update(ctx, s, metav1.UpdateOptions{}); apierrors.IsConflict(err) {
				continue // another replica renewed it
			} else if err != nil {
				return fmt.Errorf("renewing the certificate in Secret %s/%s: %w", c.o.Namespace, c.o.Secret, err)
			}
			klog.InfoS("Renewed the issuer's serving certificate", "secret", c.o.Secret)
		}
		if err := c.publish(ctx, s.Data[CAKey]); err != nil {
			return err
		}
		cert, err := tls.X509KeyPair(s.Data[CertKey], s.Data[PrivateKey])
		if err != nil {
			return fmt.Errorf("serving Secret %s/%s: certificate and key do not load", c.o.Namespace, c.o.Secret)
		}
		c.cert.Store(&cert)
		return nil
	}
	return fmt.Errorf("serving Secret %s/%s: changed at every attempt", c.o.Namespace, c.o.Secret)
}

// due tells whether data lacks a usable certificate for the DNS names,
// or holds one with less than a third of its validity left.
func (c *Certs) due(data map[string][]byte) bool {
	if _, _, err := c.signer(data); err != nil {
		return true
	}
	cert, err := parseCert(data[CertKey])
	if err != nil {
		return true
	}
	if _, err := tls.X509KeyPair(data[CertKey], data[PrivateKey]); err != nil {
		return true
	}
	life := min(cert.NotAfter.Sub(cert.NotBefore), c.o.Validity) // NotBefore is backdated
	return cert.NotAfter.Sub(c.now()) < life/3 || !slices.Equal(cert.DNSNames, c.o.DNSNames)
}

// fresh returns Secret data with a new serving certificate signed by the
// signer of old (a new signer if old has none that loads).
func (c *Certs) fresh(old map[string][]byte) (map[string][]byte, error) {
	now := c.now()
	caCert, caKey, err := c.signer(old)
	data := map[string][]byte{}
	if err == nil {
		data[CAKey], data[caKeyKey] = old[CAKey], old[caKeyKey]
	} else {
		if caKey, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader); err != nil {
			return nil, err
		}
		tmpl := &x509.Certificate{
			SerialNumber: serial(), Subject: pkix.Name{CommonName: "ephemeral-secrets-csi issuer signer"},
			NotBefore: now.Add(-time.Hour), NotAfter: now.Add(caValidity),
			IsCA: true, BasicConstraintsValid: true, MaxPathLenZero: true,
			KeyUsage: x509.KeyUsageCertSign,
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &caKey.PublicKey, caKey)
		if err != nil {
			return nil, err
		}
		if caCert, err = x509.ParseCertificate(der); err != nil {
			return nil, err
		}
		keyDER, err := x509.MarshalECPrivateKey(caKey)
		if err != nil {
			return nil, err
		}
		data[CAKey] = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
		data[caKeyKey] = pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER})
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(), Subject: pkix.Name{CommonName: c.o.DNSNames[0]},
		DNSNames:  c.o.DNSNames,
		NotBefore: now.Add(-5 * time.Minute), NotAfter: now.Add(c.o.Validity),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, err
	}
	data[CertKey] = append(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), data[CAKey]...)
	data[PrivateKey] = pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER})
	return data, nil
}

// publish makes the ConfigMap hold the signer's certificate.
func (c *Certs) publish(ctx context.Context, caPEM []byte) error {
	cms := c.cs.CoreV1().ConfigMaps(c.o.Namespace)
	cm, err := cms.Get(ctx, c.o.ConfigMap, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		cm = &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: c.o.ConfigMap, Namespace: c.o.Namespace},
			Data: map[string]string{CAKey: string(caPEM)}}
		if _, err := cms.Create(ctx, cm, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("creating ConfigMap %s/%s: %w", c.o.Namespace, c.o.ConfigMap, err)
		}
		return nil
	}
	if err != nil {
		return fmt.Errorf("reading ConfigMap %s/%s: %w", c.o.Namespace, c.o.ConfigMap, err)
	}
	if cm.Data[CAKey] == string(caPEM) {
		return nil
	}
	if cm.Data == nil {
		cm.Data = map[string]string{}
	}
	cm.Data[CAKey] = string(caPEM)
	if _, err := cms.Update(ctx, cm, metav1.UpdateOptions{}); err != nil && !apierrors.IsConflict(err) {
		return fmt.Errorf("updating ConfigMap %s/%s: %w", c.o.Namespace, c.o.ConfigMap, err)
	}
	return nil
}

// RootsConfigMap reads the issuer's signer from its ConfigMap at each
// call (wire.RootsConfigMap reading with cs).
func RootsConfigMap(cs kubernetes.Interface, namespace, name string) Roots {
	return wire.RootsConfigMap(func(ctx context.Context) (map[string]string, error) {
		cm, err := cs.CoreV1().ConfigMaps(namespace).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return nil, err
		}
		return cm.Data, nil
	}, namespace, name)
}

// signer is the signer of data, unless it lives less than two serving
// certificates more: then a new signer is made and published (node
// plugins read the roots again when verification fails).
func (c *Certs) signer(data map[string][]byte) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	cert, key, err := parseSigner(data)
	if err == nil && cert.NotAfter.Sub(c.now()) < 2*c.o.Validity {
		return nil, nil, errors.New("signer expires soon")
	}
	return cert, key, err
}

func parseSigner(data map[string][]byte) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	cert, err := parseCert(data[CAKey])
	if err != nil {
		return nil, nil, err
	}
	b, _ := pem.Decode(data[caKeyKey])
	if b == nil {
		return nil, nil, errors.New("no signer key")
	}
	key, err := x509.ParseECPrivateKey(b.Bytes)
	if err != nil {
		return nil, nil, errors.New("signer key does not parse")
	}
	pub, ok := cert.PublicKey.(*ecdsa.PublicKey)
	if !ok || !pub.Equal(&key.PublicKey) || !cert.IsCA {
		return nil, nil, errors.New("signer certificate and key do not match")
	}
	return cert, key, nil
}

func parseCert(data []byte) (*x509.Certificate, error) {
	b, _ := pem.Decode(bytes.TrimSpace(data))
	if b == nil || b.Type != "CERTIFICATE" {
		return nil, errors.New("no certificate")
	}
	return x509.ParseCertificate(b.Bytes)
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 126))
	if err != nil {
		panic(err) // crypto/rand does not fail
	}
	return n
}
