package kube

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"
)

// Decode splits a YAML stream into objects, skipping empty documents.
func Decode(data []byte) ([]*unstructured.Unstructured, error) {
	dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(data), 4096)
	var out []*unstructured.Unstructured
	for {
		var obj map[string]any
		if err := dec.Decode(&obj); err == io.EOF {
			return out, nil
		} else if err != nil {
			return nil, err
		}
		if len(obj) == 0 {
			continue
		}
		out = append(out, &unstructured.Unstructured{Object: obj})
	}
}

// Apply creates the objects of a YAML stream, or with dryRun has the API
// server validate them without storing (kubectl apply --dry-run=server).
// Objects that exist already are left as they are.
func Apply(ctx context.Context, cfg *rest.Config, data []byte, dryRun bool) error {
	opts := metav1.CreateOptions{}
	if dryRun {
		opts.DryRun = []string{metav1.DryRunAll}
	}
	return forEach(ctx, cfg, data, func(ri dynamic.ResourceInterface, obj *unstructured.Unstructured) error {
		if _, err := ri.Create(ctx, obj, opts); err != nil && !apierrors.IsAlreadyExists(err) {
			return err
		}
		return nil
	})
}

// ApplyServerSide applies the objects of a YAML stream as
// `kubectl apply --server-side --force-conflicts` does, under the field
// manager named, with strict field validation: an unknown or misspelt
// field is an error.
func ApplyServerSide(ctx context.Context, cfg *rest.Config, data []byte, fieldManager string) error {
	force := true
	return forEach(ctx, cfg, data, func(ri dynamic.ResourceInterface, obj *unstructured.Unstructured) error {
		body, err := obj.MarshalJSON()
		if err != nil {
			return err
		}
		_, err = ri.Patch(ctx, obj.GetName(), types.ApplyPatchType, body, metav1.PatchOptions{
			FieldManager: fieldManager, Force: &force, FieldValidation: "Strict",
		})
		return err
	})
}

// Missing names the objects of a YAML stream the API server does not
// have (kind namespace/name).
func Missing(ctx context.Context, cfg *rest.Config, data []byte) ([]string, error) {
	var missing []string
	err := forEach(ctx, cfg, data, func(ri dynamic.ResourceInterface, obj *unstructured.Unstructured) error {
		_, err := ri.Get(ctx, obj.GetName(), metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			missing = append(missing, obj.GetKind()+" "+obj.GetNamespace()+"/"+obj.GetName())
			return nil
		}
		return err
	})
	return missing, err
}

// Delete deletes the objects of a YAML stream (kubectl delete -f), in
// the reverse order; objects already gone are no error.
func Delete(ctx context.Context, cfg *rest.Config, data []byte) error {
	objs, err := Decode(data)
	if err != nil {
		return err
	}
	var failed []error
	for i := len(objs) - 1; i >= 0; i-- {
		err := each(ctx, cfg, objs[i:i+1], func(ri dynamic.ResourceInterface, obj *unstructured.Unstructured) error {
			if err := ri.Delete(ctx, obj.GetName(), metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
				return err
			}
			return nil
		})
		if err != nil {
			failed = append(failed, err)
		}
	}
	return errors.Join(failed...)
}

// forEach calls fn for each object of a YAML stream with the client of
// its resource.
func forEach(ctx context.Context, cfg *rest.Config, data []byte, fn func(dynamic.ResourceInterface, *unstructured.Unstructured) error) error {
	objs, err := Decode(data)
	if err != nil {
		return err
	}
	return each(ctx, cfg, objs, fn)
}

func each(_ context.Context, cfg *rest.Config, objs []*unstructured.Unstructured, fn func(dynamic.ResourceInterface, *unstructured.Unstructured) error) error {
	dc, err := discovery.NewDiscoveryClientForConfig(cfg)
	if err != nil {
		return err
	}
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return err
	}
	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(dc))
	for _, obj := range objs {
		gvk := obj.GroupVersionKind()
		m, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		if err != nil {
			mapper.Reset() // a CRD created a moment ago
			if m, err = mapper.RESTMapping(gvk.GroupKind(), gvk.Version); err != nil {
				return fmt.Errorf("%s %s: %w", gvk.Kind, obj.GetName(), err)
			}
		}
		var ri dynamic.ResourceInterface = dyn.Resource(m.Resource)
		if m.Scope.Name() == "namespace" {
			ns := obj.GetNamespace()
			if ns == "" {
				ns = "default"
			}
			ri = dyn.Resource(m.Resource).Namespace(ns)
		}
		if err := fn(ri, obj); err != nil {
			return fmt.Errorf("%s %s/%s: %w", gvk.Kind, obj.GetNamespace(), obj.GetName(), err)
		}
	}
	return nil
}
