package remote_test

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/pem"
	"sync"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ephemeral-secrets/csi-driver/pkg/issuer/remote"
)

// Replicas starting together serve one certificate, signed by the signer
// the ConfigMap publishes.
func TestReplicasServeOneCertificate(t *testing.T) {
	ctx := context.Background()
	ns := "certs-race"
	if err := objs.Namespace(ctx, ns, "issuer"); err != nil {
		t.Fatal(err)
	}
	o := remote.CertOptions{Namespace: ns, Secret: "tls", ConfigMap: "ca", DNSNames: []string{"issuer.esc.svc", "issuer"}}
	replicas := make([]*remote.Certs, 4)
	var wg sync.WaitGroup
	errs := make([]error, len(replicas))
	for i := range replicas {
		c, err := remote.NewCerts(admin, o)
		if err != nil {
			t.Fatal(err)
		}
		replicas[i] = c
		wg.Add(1)
		go func() { defer wg.Done(); errs[i] = c.Ensure(ctx) }()
	}
	wg.Wait()
	var served [][]byte
	for i, c := range replicas {
		if errs[i] != nil {
			t.Fatalf("replica %d: %v", i, errs[i])
		}
		cert, err := c.GetCertificate(nil)
		if err != nil {
			t.Fatal(err)
		}
		served = append(served, cert.Certificate[0])
	}
	for _, s := range served[1:] {
		if !bytes.Equal(s, served[0]) {
			t.Fatal("replicas serve different certificates")
		}
	}
	leaf, err := x509.ParseCertificate(served[0])
	if err != nil {
		t.Fatal(err)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{DNSName: "issuer.esc.svc", Roots: roots(t, ns, "ca")}); err != nil {
		t.Errorf("the served certificate does not verify with the published signer: %v", err)
	}
}

// A certificate with a third of its validity left is renewed, by the
// same signer: node plugins need nothing new.
func TestCertificateRenewedBeforeExpiry(t *testing.T) {
	ctx := context.Background()
	ns := "certs-renew"
	if err := objs.Namespace(ctx, ns, "issuer"); err != nil {
		t.Fatal(err)
	}
	c, err := remote.NewCerts(admin, remote.CertOptions{Namespace: ns, Secret: "tls", ConfigMap: "ca", DNSNames: []string{"issuer"}, Validity: 3 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Ensure(ctx); err != nil {
		t.Fatal(err)
	}
	first, _ := c.GetCertificate(nil)
	if err := c.Ensure(ctx); err != nil {
		t.Fatal(err)
	}
	if again, _ := c.GetCertificate(nil); !bytes.Equal(again.Certificate[0], first.Certificate[0]) {
		t.Fatal("a certificate not due was renewed")
	}
	time.Sleep(2100 * time.Millisecond) // less than a third left
	if err := c.Ensure(ctx); err != nil {
		t.Fatal(err)
	}
	renewed, _ := c.GetCertificate(nil)
	if bytes.Equal(renewed.Certificate[0], first.Certificate[0]) {
		t.Fatal("a certificate due was not renewed")
	}
	leaf, _ := x509.ParseCertificate(renewed.Certificate[0])
	if _, err := leaf.Verify(x509.VerifyOptions{DNSName: "issuer", Roots: roots(t, ns, "ca")}); err != nil {
		t.Errorf("the renewed certificate does not verify with the published signer: %v", err)
	}
}

func roots(t *testing.T, ns, name string) *x509.CertPool {
	t.Helper()
	cm, err := admin.CoreV1().ConfigMaps(ns).Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if b, _ := pem.Decode([]byte(cm.Data[remote.CAKey])); b == nil || !pool.AppendCertsFromPEM([]byte(cm.Data[remote.CAKey])) {
		t.Fatal("the ConfigMap holds no certificate")
	}
	return pool
}
