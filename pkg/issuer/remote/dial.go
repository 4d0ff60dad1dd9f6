package remote

import (
	"context"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/ephemeral-secrets/csi-driver/pkg/issuer/remote/wire"
)

// Dial opens a connection (net.Dialer.DialContext).
type Dial = wire.Dial

// ServiceDial is wire.ServiceDial reading Services with cs.
func ServiceDial(cs kubernetes.Interface, dial Dial) Dial {
	return wire.ServiceDial(func(ctx context.Context, namespace, name string) (string, error) {
		svc, err := cs.CoreV1().Services(namespace).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return "", err
		}
		return svc.Spec.ClusterIP, nil
	}, dial)
}
