package spc

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"
)

// FileResolver reads SecretProviderClass documents from one local YAML file
// (documents separated by "---"). It re-reads the file when its size or
// modification time changes, so an edit is seen without a restart.
type FileResolver struct {
	path string

	mu      sync.Mutex
	modTime time.Time
	size    int64
	classes map[string]*Class // "namespace/name"
}

var _ Resolver = (*FileResolver)(nil)

// NewFileResolver loads path and fails if it cannot be parsed.
func NewFileResolver(path string) (*FileResolver, error) {
	r := &FileResolver{path: path}
	if err := r.refresh(); err != nil {
		return nil, err
	}
	return r, nil
}

// Resolve implements Resolver.
func (r *FileResolver) Resolve(_ context.Context, namespace, name string) (*Class, error) {
	if err := r.refresh(); err != nil {
		return nil, err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	c, ok := r.classes[namespace+"/"+name]
	if !ok {
		return nil, fmt.Errorf("%w: %s/%s", ErrClassNotFound, namespace, name)
	}
	if c.refusal != nil {
		return nil, c.refusal
	}
	return c, nil
}

func (r *FileResolver) refresh() error {
	st, err := os.Stat(r.path)
	if err != nil {
		return fmt.Errorf("reading classes: %w", err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.classes != nil && st.ModTime().Equal(r.modTime) && st.Size() == r.size {
		return nil
	}
	data, err := os.ReadFile(r.path)
	if err != nil {
		return fmt.Errorf("reading classes: %w", err)
	}
	classes, err := ParseClasses(data)
	if err != nil {
		return fmt.Errorf("%s: %w", r.path, err)
	}
	r.classes, r.modTime, r.size = classes, st.ModTime(), st.Size()
	return nil
}

type document struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name      string `json:"name"`
		Namespace string `json:"namespace"`
	} `json:"metadata"`
	Spec struct {
		Provider      string            `json:"provider"`
		Parameters    map[string]string `json:"parameters"`
		SecretObjects any               `json:"secretObjects"`
	} `json:"spec"`
}

// ParseClasses parses a multi-document YAML stream of SecretProviderClasses
// keyed by "namespace/name". Documents of another kind are skipped; a
// class without a namespace is in "default", as kubectl would place it. A
// class with spec.secretObjects is kept, but resolving it is refused.
func ParseClasses(data []byte) (map[string]*Class, error) {
	classes := map[string]*Class{}
	reader := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	for i := 0; ; i++ {
		raw, err := reader.Read()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("document %d: %w", i+1, err)
		}
		var d document
		if err := yaml.Unmarshal(raw, &d); err != nil {
			return nil, fmt.Errorf("document %d: %w", i+1, err)
		}
		if d.Kind == "" && d.APIVersion == "" {
			continue // empty or comment-only document
		}
		if d.Kind != Kind || d.APIVersion != APIVersion {
			continue
		}
		ns := d.Metadata.Namespace
		if ns == "" {
			ns = "default"
		}
		if err := ValidateObjectName(d.Metadata.Name); err != nil {
			return nil, fmt.Errorf("document %d: metadata.name: %w", i+1, err)
		}
		if err := ValidateObjectName(ns); err != nil {
			return nil, fmt.Errorf("document %d: metadata.namespace: %w", i+1, err)
		}
		if d.Spec.Provider == "" {
			return nil, fmt.Errorf("document %d: spec.provider is empty", i+1)
		}
		key := ns + "/" + d.Metadata.Name
		if _, dup := classes[key]; dup {
			return nil, fmt.Errorf("document %d: class %s defined twice", i+1, key)
		}
		params := d.Spec.Parameters
		if params == nil {
			params = map[string]string{}
		}
		c := &Class{Namespace: ns, Name: d.Metadata.Name, Provider: d.Spec.Provider, Parameters: params}
		if !isEmpty(d.Spec.SecretObjects) {
			c.refusal = refuseSecretObjects(ns, d.Metadata.Name)
		}
		classes[key] = c
	}
	return classes, nil
}
