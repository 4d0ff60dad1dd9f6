package provider

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"strings"
)

// PodToken returns the pod's service-account token for audience, after
// checking that it names the pod's own identity: its subject is the pod's
// service account and, where the token is bound to a pod (as every token
// kubelet requests for a CSI driver is), that pod is this one.
//
// Where the CSIDriver requests no token, whatever arrives under the
// tokens key came from the pod (its volume attributes or a Secret its
// nodePublishSecretRef names): a token of another identity must not be
// presented for it. A token of its own identity is no gain to a pod: it can
// mint one for any audience in a projected volume. The signature is the
// backend's to verify; errors never quote the token.
func PodToken(req Request, audience string) (string, error) {
	t, ok := req.Tokens[audience]
	if !ok || t.Token == "" {
		return "", fmt.Errorf("%w: no service-account token for audience %q (add it to the CSIDriver's tokenRequests)", ErrPermissionDenied, audience)
	}
	var claims struct {
		Subject string `json:"sub"`
		K8s     struct {
			Namespace string `json:"namespace"`
			Pod       *struct {
				UID string `json:"uid"`
			} `json:"pod"`
		} `json:"kubernetes.io"`
	}
	parts := strings.Split(t.Token, ".")
	if len(parts) != 3 {
		return "", fmt.Errorf("%w: the service-account token for audience %q is not a JWT", ErrPermissionDenied, audience)
	}
	payload, err := base64.RawURLEncoding.DecodeString(strings.TrimRight(parts[1], "="))
	if err != nil || json.Unmarshal(payload, &claims) != nil {
		return "", fmt.Errorf("%w: the service-account token for audience %q has no readable claims", ErrPermissionDenied, audience)
	}
	want := "system:serviceaccount:" + req.Pod.Namespace + ":" + req.Pod.ServiceAccount
	if claims.Subject != want || (claims.K8s.Namespace != "" && claims.K8s.Namespace != req.Pod.Namespace) {
		return "", fmt.Errorf("%w: the service-account token for audience %q is not of the pod's service account %s/%s",
			ErrPermissionDenied, audience, req.Pod.Namespace, req.Pod.ServiceAccount)
	}
	if claims.K8s.Pod != nil && req.Pod.UID != "" && claims.K8s.Pod.UID != req.Pod.UID {
		return "", fmt.Errorf("%w: the service-account token for audience %q is bound to another pod", ErrPermissionDenied, audience)
	}
	return t.Token, nil
}
