package awstest

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"time"
)

// Secrets speaks the JSON protocol of Secrets Manager (GetSecretValue) and
// SSM (GetParameter), with responses shaped after the AWS API reference.
type Secrets struct {
	srv *httptest.Server

	mu       sync.Mutex
	secrets  map[string][]secretVersion // newest last
	params   map[string][]string        // versions, 1-based
	throttle int                        // answer this many requests with ThrottlingException first
	deny     map[string]bool
	requests int
}

type secretVersion struct{ id, value string }

// StartSecrets starts the server.
func StartSecrets() *Secrets {
	s := &Secrets{secrets: map[string][]secretVersion{}, params: map[string][]string{}, deny: map[string]bool{}}
	s.srv = httptest.NewServer(http.HandlerFunc(s.serve))
	return s
}

// URL is the endpoint for both services.
func (s *Secrets) URL() string { return s.srv.URL }

// Close stops the server.
func (s *Secrets) Close() { s.srv.Close() }

// PutSecret adds a version of a secret.
func (s *Secrets) PutSecret(name, value string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.secrets[name] = append(s.secrets[name], secretVersion{id: fmt.Sprintf("v%d-%d", len(s.secrets[name])+1, time.Now().UnixNano()), value: value})
}

// PutParameter adds a version of a parameter.
func (s *Secrets) PutParameter(name, value string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.params[name] = append(s.params[name], value)
}

// Deny makes reads of name fail with AccessDeniedException.
func (s *Secrets) Deny(name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.deny[name] = true
}

// Throttle answers the next n requests with ThrottlingException.
func (s *Secrets) Throttle(n int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.throttle = n
}

// Requests is how many requests arrived.
func (s *Secrets) Requests() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.requests
}

func apiError(w http.ResponseWriter, status int, typ, msg string) {
	w.Header().Set("Content-Type", "application/x-amz-json-1.1")
	w.Header().Set("X-Amzn-ErrorType", typ)
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]string{"__type": typ, "Message": msg})
}

func (s *Secrets) serve(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.requests++
	auth := r.Header.Get("Authorization")
	if !strings.HasPrefix(auth, "AWS4-HMAC-SHA256 Credential=") {
		apiError(w, http.StatusBadRequest, "MissingAuthenticationTokenException", "Request is missing Authentication Token")
		return
	}
	if s.throttle > 0 {
		s.throttle--
		apiError(w, http.StatusBadRequest, "ThrottlingException", "Rate exceeded")
		return
	}
	var in map[string]any
	if err := json.NewDecoder(r.Body).Decode(&in); err != nil {
		apiError(w, http.StatusBadRequest, "SerializationException", "bad JSON")
		return
	}
	w.Header().Set("Content-Type", "application/x-amz-json-1.1")
	switch r.Header.Get("X-Amz-Target") {
	case "secretsmanager.GetSecretValue":
		name, _ := in["SecretId"].(string)
		if s.deny[name] {
			apiError(w, http.StatusBadRequest, "AccessDeniedException", "User is not authorized to perform: secretsmanager:GetSecretValue on resource: "+name)
			return
		}
		versions := s.secrets[name]
		if len(versions) == 0 {
			apiError(w, http.StatusBadRequest, "ResourceNotFoundException", "Secrets Manager can't find the specified secret.")
			return
		}
		v := versions[len(versions)-1]
		if id, _ := in["VersionId"].(string); id != "" {
			found := false
			for _, c := range versions {
				if c.id == id {
					v, found = c, true
				}
			}
			if !found {
				apiError(w, http.StatusBadRequest, "ResourceNotFoundException", "Secrets Manager can't find the specified secret version.")
				return
			}
		}
		_ = json.NewEncoder(w).Encode(map[string]any{
			"ARN": "arn:aws:secretsmanager:us-east-1:111122223333:secret:" + name, "Name": name,
			"VersionId": v.id, "SecretString": v.value, "VersionStages": []string{"AWSCURRENT"},
			"CreatedDate": float64(time.Now().Unix()),
		})
	case "AmazonSSM.GetParameter":
		name, _ := in["Name"].(string)
		version := 0
		if i := strings.LastIndex(name, ":"); i > 0 {
			fmt.Sscan(name[i+1:], &version)
			name = name[:i]
		}
		versions := s.params[name]
		if s.deny[name] {
			apiError(w, http.StatusBadRequest, "AccessDeniedException", "User is not authorized to perform: ssm:GetParameter on resource: "+name)
			return
		}
		if len(versions) == 0 || version > len(versions) {
			apiError(w, http.StatusBadRequest, "ParameterNotFound", "")
			return
		}
		if version == 0 {
			version = len(versions)
		}
		_ = json.NewEncoder(w).Encode(map[string]any{"Parameter": map[string]any{
			"Name": name, "Type": "SecureString", "Value": versions[version-1], "Version": version,
			"ARN": "arn:aws:ssm:us-east-1:111122223333:parameter" + name, "DataType": "text",
			"LastModifiedDate": float64(time.Now().Unix()),
		}})
	default:
		apiError(w, http.StatusBadRequest, "UnknownOperationException", "unknown operation")
	}
}
