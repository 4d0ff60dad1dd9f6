package allinone

import (
	"encoding/json"
	"fmt"
	"reflect"
	"regexp"
	"slices"
	"strings"

	yaml3 "go.yaml.in/yaml/v3"
)

// locate explains why the backend file data does not decode: the loaders
// say only "not valid" (the YAML library's messages can quote a line of a
// file that holds admin credentials). It walks the YAML, with its line
// numbers, along the configuration's Go types and names each key that is
// unknown, given twice or of the wrong kind. It quotes keys only when they
// look like names, and values never. The verdict is the loader's: locate
// only points at the place.
func locate(data []byte, schema reflect.Type) []string {
	var doc yaml3.Node
	if err := yaml3.Unmarshal(data, &doc); err != nil {
		if m := yamlLine.FindStringSubmatch(err.Error()); m != nil {
			return []string{"line " + m[1] + ": not valid YAML (indentation, a missing ':' or an unclosed quote)"}
		}
		return []string{"not valid YAML"}
	}
	if len(doc.Content) == 0 {
		return nil
	}
	var out []string
	walk(doc.Content[0], schema, "", &out)
	return out
}

var yamlLine = regexp.MustCompile(`line (\d+)`)

// printableKey is a key that is a name (a connection, a role, an
// address), shown in messages; anything else (a line whose indentation
// made a value into a key, say) is not.
// (The length is checked apart: a bounded repetition in the expression
// would compile to a hundred copies of the class at start-up.)
var printableKey = regexp.MustCompile(`^[A-Za-z0-9._:/*-]+$`)

func showKey(k string) string {
	if len(k) <= 100 && printableKey.MatchString(k) {
		return k
	}
	return "(a key not shown)"
}

var jsonUnmarshaler = reflect.TypeFor[json.Unmarshaler]()

// rawSection is a section kept undecoded (json.RawMessage).
var rawSection = reflect.TypeFor[json.RawMessage]()

// walk checks n against t (decoded as sigs.k8s.io/yaml does: YAML to
// JSON, then encoding/json with unknown fields refused) and appends
// what does not fit to out; path names n.
func walk(n *yaml3.Node, t reflect.Type, path string, out *[]string) {
	if n.Kind == yaml3.AliasNode {
		n = n.Alias
	}
	if n.Kind == yaml3.ScalarNode && n.Tag == "!!null" {
		return // null decodes into anything
	}
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t == rawSection {
		return // a section this binary keeps undecoded: its Section checks it
	}
	at := func(format string, a ...any) {
		p := path
		if p == "" {
			p = "(top)"
		}
		*out = append(*out, fmt.Sprintf("line %d: %s: %s", n.Line, p, fmt.Sprintf(format, a...)))
	}
	if reflect.PointerTo(t).Implements(jsonUnmarshaler) {
		if n.Kind != yaml3.ScalarNode {
			at("a single value expected (a duration such as \"1h\")")
		}
		return
	}
	switch t.Kind() {
	case reflect.Struct:
		if n.Kind != yaml3.MappingNode {
			at("a mapping of keys expected")
			return
		}
		fields := jsonFields(t)
		seen := map[string]bool{}
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			var ft reflect.Type
			var name string
			for fname, f := range fields {
				if strings.EqualFold(fname, k.Value) { // as encoding/json matches
					ft, name = f, fname
				}
			}
			kp := join(path, showKey(k.Value))
			if ft == nil {
				*out = append(*out, fmt.Sprintf("line %d: %s: unknown key; known here: %s", k.Line, kp, strings.Join(sortedKeys(fields), ", ")))
				continue
			}
			if seen[name] {
				*out = append(*out, fmt.Sprintf("line %d: %s: given twice", k.Line, kp))
			}
			seen[name] = true
			walk(v, ft, join(path, name), out)
		}
	case reflect.Map:
		if n.Kind != yaml3.MappingNode {
			at("a mapping of names expected")
			return
		}
		seen := map[string]bool{}
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			kp := path + "[" + showKey(k.Value) + "]"
			if seen[k.Value] {
				*out = append(*out, fmt.Sprintf("line %d: %s: given twice", k.Line, kp))
			}
			seen[k.Value] = true
			walk(v, t.Elem(), kp, out)
		}
	case reflect.Slice:
		if n.Kind != yaml3.SequenceNode {
			at("a list expected")
			return
		}
		for i, v := range n.Content {
			walk(v, t.Elem(), fmt.Sprintf("%s[%d]", path, i), out)
		}
	case reflect.String:
		if n.Kind != yaml3.ScalarNode || n.Tag != "!!str" {
			at("a string expected (quote it)")
		}
	case reflect.Bool:
		if n.Kind != yaml3.ScalarNode || n.Tag != "!!bool" {
			at("true or false expected")
		}
	case reflect.Int, reflect.Int32, reflect.Int64:
		if n.Kind != yaml3.ScalarNode || n.Tag != "!!int" {
			at("a whole number expected")
		}
	}
}

// jsonFields are the keys of struct t as encoding/json reads them,
// embedded structs' included.
func jsonFields(t reflect.Type) map[string]reflect.Type {
	out := map[string]reflect.Type{}
	for f := range t.Fields() {
		if !f.IsExported() {
			continue
		}
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		if name == "-" {
			continue
		}
		if f.Anonymous && name == "" {
			for k, v := range jsonFields(f.Type) {
				out[k] = v
			}
			continue
		}
		if name == "" {
			name = f.Name
		}
		out[name] = f.Type
	}
	return out
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

// Keys are the keys a backend file of type schema may hold, as its
// decoder knows them ("a.b", a map's keys as "*", a list's items as
// "[]"), sorted: what the generated reference (docs/backends.md) must
// list.
func Keys(schema reflect.Type) []string {
	var keys []string
	var walk func(prefix string, t reflect.Type)
	walk = func(prefix string, t reflect.Type) {
		for t.Kind() == reflect.Pointer {
			t = t.Elem()
		}
		switch {
		case reflect.PointerTo(t).Implements(jsonUnmarshaler):
		case t.Kind() == reflect.Struct:
			for key, ft := range jsonFields(t) {
				keys = append(keys, join(prefix, key))
				walk(join(prefix, key), ft)
			}
		case t.Kind() == reflect.Map:
			walk(prefix+".*", t.Elem())
		case t.Kind() == reflect.Slice:
			walk(prefix+".[]", t.Elem())
		}
	}
	walk("", schema)
	slices.Sort(keys)
	return keys
}
