package remote

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"time"

	"k8s.io/klog/v2"

	"github.com/ephemeral-secrets/csi-driver/pkg/issuer"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/provider/postgres"
)

// ServerOptions shape a Server.
type ServerOptions struct {
	Authority     Authority
	Authenticator Authenticator
	// Timeout bounds one call to the Authority (default 30s).
	Timeout time.Duration
	// Observe, if set, is told each call's verb, code ("OK", a code of
	// the wire, or "Internal") and duration.
	Observe func(verb, code string, d time.Duration)
}

// Server serves the Authority to authenticated node plugins.
type Server struct {
	o ServerOptions
}

// NewServer returns a Server.
func NewServer(o ServerOptions) *Server {
	if o.Timeout <= 0 {
		o.Timeout = 30 * time.Second
	}
	return &Server{o: o}
}

// Handler is the server's routes: one handler a verb, POST only.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("POST "+MintPath, handle(s, "mint", func(ctx context.Context, c issuer.Caller, r postgres.MintRequest) (any, error) {
		return s.o.Authority.Mint(ctx, c, r)
	}, func(r postgres.MintRequest) []string { return []string{r.Verifier} }))
	mux.Handle("POST "+ExtendPath, handle(s, "extend", func(ctx context.Context, c issuer.Caller, r postgres.ExtendRequest) (any, error) {
		return s.o.Authority.Extend(ctx, c, r)
	}, nil))
	mux.Handle("POST "+DropPath, handle(s, "drop", func(ctx context.Context, c issuer.Caller, r postgres.DropRequest) (any, error) {
		return struct{}{}, s.o.Authority.Drop(ctx, c, r)
	}, nil))
	return mux
}

// Serve serves the handler over TLS on l until ctx is done, with
// explicit timeouts; getCert gives the serving certificate (it can
// change while serving).
func (s *Server) Serve(ctx context.Context, l net.Listener, getCert func(*tls.ClientHelloInfo) (*tls.Certificate, error)) error {
	srv := &http.Server{
		Handler:           s.Handler(),
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       15 * time.Second,
		WriteTimeout:      s.o.Timeout + 15*time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    16 << 10,
		TLSConfig:         &tls.Config{MinVersion: tls.VersionTLS12, GetCertificate: getCert},
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.ServeTLS(l, "", "") }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
		sctx, cancel := context.WithTimeout(context.Background(), s.o.Timeout)
		defer cancel()
		_ = srv.Shutdown(sctx)
		return nil
	}
}

// handle decodes a request of type R, authenticates the caller, calls
// the Authority and writes the answer. secrets lists the request's
// values no answer may quote.
func handle[R any](s *Server, verb string, call func(context.Context, issuer.Caller, R) (any, error), secrets func(R) []string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		var req R
		var hide []string
		out, caller, err := func() (any, issuer.Caller, error) {
			token, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
			if !ok {
				token = ""
			}
			ctx, cancel := context.WithTimeout(r.Context(), s.o.Timeout)
			defer cancel()
			caller, err := s.o.Authenticator.Authenticate(ctx, strings.TrimSpace(token))
			if err != nil {
				return nil, caller, err
			}
			dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxBody))
			dec.DisallowUnknownFields()
			if err := dec.Decode(&req); err != nil {
				return nil, caller, fmt.Errorf("%w: request body is not a %s request", provider.ErrInvalidParameters, verb)
			}
			if secrets != nil {
				hide = secrets(req)
			}
			out, err := call(ctx, caller, req)
			return out, caller, err
		}()
		code := "OK"
		if err != nil {
			var status int
			code, status = encodeError(err)
			msg := redact(err.Error(), hide...)
			writeJSON(w, status, errorBody{Error: wireError{Code: code, Message: msg}})
			if code == "" {
				code = "Internal"
			}
			klog.V(2).InfoS("Issuer call refused", "verb", verb, "node", caller.Node, "code", code, "err", msg)
		} else {
			writeJSON(w, http.StatusOK, out)
			klog.V(4).InfoS("Issuer call", "verb", verb, "node", caller.Node)
		}
		if s.o.Observe != nil {
			s.o.Observe(verb, code, time.Since(start))
		}
	})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	if err := json.NewEncoder(w).Encode(v); err != nil && !errors.Is(err, http.ErrHandlerTimeout) {
		klog.V(4).InfoS("Writing an issuer answer", "err", err)
	}
}
