// Package render turns a lease into the files a pod reads: which files,
// their names, modes and contents (raw values, templates, env or JSON).
//
// It imports pkg/provider (the lease it renders), pkg/storage (the File it
// produces, the size error) and pkg/volumepath.
package render

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"text/template"
	"text/template/parse"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/storage"
	"github.com/ephemeral-secrets/csi-driver/pkg/volumepath"
)

// Class parameters render reads; the rest belong to the provider.
const (
	FilesParam    = "files"
	FileModeParam = "fileMode"
)

// DefaultMode is the mode of a file whose class names none: readable by
// root and the volume's mount group only.
const DefaultMode os.FileMode = 0o440

// MaxFiles bounds how many files one volume may hold.
const MaxFiles = 64

// ErrInvalidSpec means the class's file parameters are wrong.
var ErrInvalidSpec = errors.New("invalid file specification")

// IsParam reports whether a class parameter belongs to render.
func IsParam(key string) bool {
	return key == FilesParam || key == FileModeParam || key == LeaseAPIParam || key == MaxTasksParam
}

// FileSpec is one entry of the class's "files" parameter. Exactly one of
// Value, Template or Format says what goes in the file.
type FileSpec struct {
	Path     string `json:"path"`
	Value    string `json:"value,omitempty"`    // a lease value by name, as is
	Template string `json:"template,omitempty"` // Go text/template over the values and info
	Format   string `json:"format,omitempty"`   // "env" or "json": every value and info entry
	Mode     string `json:"mode,omitempty"`     // octal, e.g. "0400"

	mode os.FileMode
	tmpl *template.Template
}

// Spec is the parsed file layout of a class.
type Spec struct {
	Files       []FileSpec
	DefaultMode os.FileMode
	// LeaseAPI: the volume has a lease socket; MaxTasks bounds its live
	// task leases.
	LeaseAPI bool
	MaxTasks int
	limits   Limits
}

// ParseSpec reads and checks the render parameters of a class, to be
// rendered within the default Limits.
func ParseSpec(params map[string]string) (*Spec, error) {
	return ParseSpecWithin(params, Limits{})
}

// ParseSpecWithin reads and checks the render parameters of a class, to be
// rendered within limits (zero fields take the defaults). With no "files"
// parameter every lease value becomes a file named after it.
func ParseSpecWithin(params map[string]string, limits Limits) (*Spec, error) {
	s := &Spec{DefaultMode: DefaultMode, limits: limits.withDefaults()}
	if err := s.parseLeaseAPI(params); err != nil {
		return nil, err
	}
	if m, ok := params[FileModeParam]; ok {
		mode, err := parseMode(m)
		if err != nil {
			return nil, fmt.Errorf("%w: %s: %v", ErrInvalidSpec, FileModeParam, err)
		}
		s.DefaultMode = mode
	}
	raw, ok := params[FilesParam]
	if !ok {
		return s, nil
	}
	if err := yaml.UnmarshalStrict([]byte(raw), &s.Files); err != nil {
		return nil, fmt.Errorf("%w: %s is not a YAML list of {path, value|template|format, mode}: %v", ErrInvalidSpec, FilesParam, err)
	}
	if len(s.Files) == 0 || len(s.Files) > MaxFiles {
		return nil, fmt.Errorf("%w: %s must list 1 to %d files", ErrInvalidSpec, FilesParam, MaxFiles)
	}
	seen := map[string]bool{}
	for i := range s.Files {
		f := &s.Files[i]
		if err := volumepath.Check(f.Path); err != nil {
			return nil, fmt.Errorf("%w: files[%d]: %v", ErrInvalidSpec, i, err)
		}
		if seen[f.Path] {
			return nil, fmt.Errorf("%w: files[%d]: path %q listed twice", ErrInvalidSpec, i, f.Path)
		}
		seen[f.Path] = true
		n := 0
		for _, set := range []bool{f.Value != "", f.Template != "", f.Format != ""} {
			if set {
				n++
			}
		}
		if n != 1 {
			return nil, fmt.Errorf("%w: files[%d] (%s): set exactly one of value, template, format", ErrInvalidSpec, i, f.Path)
		}
		if f.Format != "" && f.Format != "env" && f.Format != "json" {
			return nil, fmt.Errorf("%w: files[%d] (%s): format %q is not env or json", ErrInvalidSpec, i, f.Path, f.Format)
		}
		f.mode = s.DefaultMode
		if f.Mode != "" {
			mode, err := parseMode(f.Mode)
			if err != nil {
				return nil, fmt.Errorf("%w: files[%d] (%s): mode: %v", ErrInvalidSpec, i, f.Path, err)
			}
			f.mode = mode
		}
		if f.Template != "" {
			t, err := template.New(f.Path).Option("missingkey=error").Parse(f.Template)
			if err != nil {
				return nil, fmt.Errorf("%w: files[%d] (%s): template: %v", ErrInvalidSpec, i, f.Path, err)
			}
			if len(t.Templates()) > 1 || callsTemplate(t.Tree.Root) {
				// Templates that call templates can recurse without end: a
				// class author could stall the node's driver.
				return nil, fmt.Errorf("%w: files[%d] (%s): template: define, template and block are not allowed", ErrInvalidSpec, i, f.Path)
			}
			if err := bound(t.Tree.Root, s.limits); err != nil {
				return nil, fmt.Errorf("files[%d] (%s): template: %w", i, f.Path, err)
			}
			f.tmpl = t
		}
	}
	// A file and a directory of the same name cannot both exist.
	for p := range seen {
		for dir := p; strings.Contains(dir, "/"); {
			dir = dir[:strings.LastIndex(dir, "/")]
			if seen[dir] {
				return nil, fmt.Errorf("%w: %q is both a file and a directory", ErrInvalidSpec, dir)
			}
		}
	}
	return s, nil
}

// callsTemplate reports whether a template tree calls another template.
func callsTemplate(n parse.Node) bool {
	switch n := n.(type) {
	case *parse.TemplateNode:
		return true
	case *parse.ListNode:
		if n == nil {
			return false
		}
		for _, c := range n.Nodes {
			if callsTemplate(c) {
				return true
			}
		}
	case *parse.IfNode:
		return callsTemplate(n.List) || callsTemplate(n.ElseList)
	case *parse.RangeNode:
		return callsTemplate(n.List) || callsTemplate(n.ElseList)
	case *parse.WithNode:
		return callsTemplate(n.List) || callsTemplate(n.ElseList)
	}
	return false
}

func parseMode(s string) (os.FileMode, error) {
	v, err := strconv.ParseUint(s, 8, 32)
	if err != nil || v > 0o777 {
		return 0, fmt.Errorf("%q is not an octal file mode such as 0440", s)
	}
	return os.FileMode(v), nil
}

// valueMode is the mode of a file holding value name of l: the one the
// provider was asked for (Lease.Modes), else def. A provider's mode
// grants reading only: a write or execute bit is refused.
func valueMode(l provider.Lease, name string, def os.FileMode) (os.FileMode, error) {
	m, ok := l.Modes[name]
	if !ok {
		return def, nil
	}
	if m&^0o444 != 0 {
		return 0, fmt.Errorf("%w: %s: mode %#o grants more than reading", ErrInvalidSpec, name, m)
	}
	return m, nil
}

// Render makes the files for lease l within the spec's Limits: past the
// byte cap (all files together) storage.ErrTooLarge, past the steps or
// time ErrInvalidSpec, both before anything larger than the cap is built.
// Errors never quote a value.
func (s *Spec) Render(l provider.Lease) ([]storage.File, error) {
	r := newRun(s.limits)
	data := make(map[string]string, len(l.Values)+len(l.Info)+2)
	for k, v := range l.Info {
		data[k] = v
	}
	for k, v := range l.Values {
		data[k] = v
	}
	data["lease_id"] = l.ID
	if !l.ExpiresAt.IsZero() {
		data["expires_at"] = l.ExpiresAt.UTC().Format(time.RFC3339)
	}
	if len(s.Files) == 0 {
		files := make([]storage.File, 0, len(l.Values))
		for _, k := range sortedKeys(l.Values) {
			if err := volumepath.Check(k); err != nil {
				return nil, fmt.Errorf("%w: value name: %v", ErrInvalidSpec, err)
			}
			if err := r.wrote(len(l.Values[k])); err != nil {
				return nil, sizeError(k, s.limits)
			}
			mode, err := valueMode(l, k, s.DefaultMode)
			if err != nil {
				return nil, err
			}
			files = append(files, storage.File{Path: k, Mode: mode, Data: []byte(l.Values[k])})
		}
		return files, nil
	}
	files := make([]storage.File, 0, len(s.Files))
	for _, f := range s.Files {
		var out []byte
		mode := f.mode
		if f.Value != "" && f.Mode == "" {
			var err error
			if mode, err = valueMode(l, f.Value, f.mode); err != nil {
				return nil, err
			}
		}
		switch {
		case f.Value != "":
			v, ok := data[f.Value]
			if !ok {
				return nil, fmt.Errorf("%w: %s: the lease has no value %q (it has %s)", ErrInvalidSpec, f.Path, f.Value, strings.Join(sortedKeys(data), ", "))
			}
			if err := r.wrote(len(v)); err != nil {
				return nil, sizeError(f.Path, s.limits)
			}
			out = []byte(v)
		case f.tmpl != nil:
			var err error
			if out, err = execute(f, data, r); err != nil {
				if errors.Is(err, errBytes) {
					return nil, sizeError(f.Path, s.limits)
				}
				return nil, fmt.Errorf("%w: %s: template: %w", ErrInvalidSpec, f.Path, templateError(err))
			}
		case f.Format == "env":
			out = envFile(data)
		case f.Format == "json":
			b, err := json.MarshalIndent(data, "", "  ")
			if err != nil {
				return nil, err
			}
			out = append(b, '\n')
		}
		if f.tmpl == nil && f.Format != "" {
			// At most one such file (bounded by the lease's own values)
			// is built past the cap before this stops the rest.
			if err := r.wrote(len(out)); err != nil {
				return nil, sizeError(f.Path, s.limits)
			}
		}
		files = append(files, storage.File{Path: f.Path, Mode: mode, Data: out})
	}
	return files, nil
}

// execute runs one file's template under budget r.
func execute(f FileSpec, data map[string]string, r *run) ([]byte, error) {
	w := &writer{r: r}
	if err := executeTree(f.tmpl.Tree, w, data, r); err != nil {
		return nil, err
	}
	return w.Bytes(), nil
}

// templateError keeps the location of a template failure and drops
// anything that could carry a value.
func templateError(err error) error {
	// Our own refusals (a budget, a printf format) say why, never a value.
	for u := err; u != nil; u = errors.Unwrap(u) {
		if inner := errors.Unwrap(u); inner == ErrBudget || inner == ErrInvalidSpec {
			return u
		}
	}
	var ee *execError
	if errors.As(err, &ee) {
		msg := ee.Error()
		if i := strings.Index(msg, ": "); i > 0 && strings.Contains(msg, "map has no entry for key") {
			return errors.New(msg[i+2:])
		}
		return errors.New("execution failed at " + ee.name)
	}
	return errors.New("execution failed")
}

func envFile(data map[string]string) []byte {
	var b bytes.Buffer
	for _, k := range sortedKeys(data) {
		name := strings.ToUpper(strings.Map(func(r rune) rune {
			if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' {
				return r
			}
			return '_'
		}, k))
		fmt.Fprintf(&b, "%s='%s'\n", name, strings.ReplaceAll(data[k], "'", `'\''`))
	}
	return b.Bytes()
}

func sortedKeys(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
