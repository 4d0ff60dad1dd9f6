// Package backendsref generates the reference of the backend file
// (backends.yaml, --backend-config) from the Go types the driver and the
// issuer decode it into, starting at pkg/cli/allinone's backendConfig: every key
// is a field's JSON name, every description the field's doc comment.
// It reads the source with go/parser (no type checking, no build): the
// configuration's types are plain structs, maps, lists, pointers,
// scalars, and named types that decode themselves from a string
// (postgres.Duration). A field without a doc comment is an error, so the
// reference cannot silently lose a key's meaning.
//
// make docs writes docs/backends.md; test/docs fails when it is stale.
package backendsref

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"sort"
	"strconv"
	"strings"
)

// Entry is where the reference starts: the package (relative to the
// module root) and the type the backend file decodes into.
const (
	EntryDir  = "pkg/cli/allinone"
	EntryType = "backendConfig"
	// Output is the generated file, relative to the module root.
	Output = "docs/backends.md"
)

// Field is one key of the backend file.
type Field struct {
	Key  string // the JSON (YAML) key
	Type string // what the value is, in words
	Doc  string // the field's doc comment, on one line
	// Ref is the section describing the value's structure, if any.
	Ref string

	goName string
}

// Section is one struct of the configuration.
type Section struct {
	Title  string // Go name, qualified: postgres.Role
	Anchor string
	Doc    string // the type's doc comment
	Fields []Field
}

// Generate returns the reference, rendered as Markdown, for the module
// whose root is root.
func Generate(root string) ([]byte, error) {
	g, err := newGen(root)
	if err != nil {
		return nil, err
	}
	top, err := g.section(EntryDir, EntryType)
	if err != nil {
		return nil, err
	}
	return g.render(top), nil
}

// Keys returns every key path of the file (postgres.connections.*.url,
// with * for names chosen by the admin), for tests that hold the
// generator to the types' decoding.
func Keys(root string) ([]string, error) {
	g, err := newGen(root)
	if err != nil {
		return nil, err
	}
	if _, err := g.section(EntryDir, EntryType); err != nil {
		return nil, err
	}
	var out []string
	var walk func(prefix, title string)
	walk = func(prefix, title string) {
		s := g.byTitle[title]
		for _, f := range s.Fields {
			p := f.Key
			if prefix != "" {
				p = prefix + "." + f.Key
			}
			out = append(out, p)
			if f.Ref != "" {
				walk(p+g.refSuffix[title+"."+f.Key], f.Ref)
			}
		}
	}
	walk("", g.topTitle)
	sort.Strings(out)
	return out, nil
}

type pkgSrc struct {
	name    string
	types   map[string]*ast.TypeSpec
	docs    map[string]string // type doc comments
	methods map[string][]string
	imports map[string]map[string]string // file of each type → import name → path
	fileOf  map[string]string
}

type gen struct {
	root, module string
	pkgs         map[string]*pkgSrc // by directory relative to root
	sections     []*Section         // in order of first use
	byTitle      map[string]*Section
	refSuffix    map[string]string // "Title.key" → ".*" or "[]" between key and the referenced struct's keys
	topTitle     string
}

func newGen(root string) (*gen, error) {
	mod, err := os.ReadFile(filepath.Join(root, "go.mod"))
	if err != nil {
		return nil, err
	}
	m := regexp.MustCompile(`(?m)^module\s+(\S+)`).FindSubmatch(mod)
	if m == nil {
		return nil, errors.New("go.mod has no module line")
	}
	return &gen{root: root, module: string(m[1]), pkgs: map[string]*pkgSrc{},
		byTitle: map[string]*Section{}, refSuffix: map[string]string{}}, nil
}

// load parses the non-test Go files of the package in dir.
func (g *gen) load(dir string) (*pkgSrc, error) {
	if p, ok := g.pkgs[dir]; ok {
		return p, nil
	}
	files, err := filepath.Glob(filepath.Join(g.root, dir, "*.go"))
	if err != nil {
		return nil, err
	}
	p := &pkgSrc{types: map[string]*ast.TypeSpec{}, docs: map[string]string{}, methods: map[string][]string{},
		imports: map[string]map[string]string{}, fileOf: map[string]string{}}
	fset := token.NewFileSet()
	for _, name := range files {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, name, nil, parser.ParseComments)
		if err != nil {
			return nil, err
		}
		p.name = f.Name.Name
		imps := map[string]string{}
		for _, im := range f.Imports {
			path, _ := strconv.Unquote(im.Path.Value)
			n := path[strings.LastIndex(path, "/")+1:]
			if im.Name != nil {
				n = im.Name.Name
			}
			imps[n] = path
		}
		p.imports[name] = imps
		for _, d := range f.Decls {
			switch d := d.(type) {
			case *ast.GenDecl:
				for _, s := range d.Specs {
					ts, ok := s.(*ast.TypeSpec)
					if !ok {
						continue
					}
					p.types[ts.Name.Name] = ts
					p.fileOf[ts.Name.Name] = name
					doc := ts.Doc
					if doc == nil && len(d.Specs) == 1 {
						doc = d.Doc
					}
					p.docs[ts.Name.Name] = oneLine(doc)
				}
			case *ast.FuncDecl:
				if d.Recv != nil && len(d.Recv.List) == 1 {
					t := d.Recv.List[0].Type
					if st, ok := t.(*ast.StarExpr); ok {
						t = st.X
					}
					if id, ok := t.(*ast.Ident); ok {
						p.methods[id.Name] = append(p.methods[id.Name], d.Name.Name)
					}
				}
			}
		}
	}
	if p.name == "" {
		return nil, fmt.Errorf("no Go package in %s", dir)
	}
	g.pkgs[dir] = p
	return p, nil
}

func oneLine(cg *ast.CommentGroup) string {
	if cg == nil {
		return ""
	}
	return strings.Join(strings.Fields(cg.Text()), " ")
}

// title is how a type is named in the reference: package.Type, the
// entry type by its role.
func (g *gen) title(p *pkgSrc, name string) string { return p.name + "." + name }

// section describes the struct type name of the package in dir, and
// every struct it reaches.
func (g *gen) section(dir, name string) (string, error) {
	p, err := g.load(dir)
	if err != nil {
		return "", err
	}
	title := g.title(p, name)
	if _, ok := g.byTitle[title]; ok {
		return title, nil
	}
	ts, ok := p.types[name]
	if !ok {
		return "", fmt.Errorf("%s: no type %s", dir, name)
	}
	st, ok := ts.Type.(*ast.StructType)
	if !ok {
		return "", fmt.Errorf("%s.%s is not a struct", dir, name)
	}
	s := &Section{Title: title, Anchor: anchor(title), Doc: typeDoc(p.docs[name], name)}
	g.byTitle[title] = s
	g.sections = append(g.sections, s)
	if g.topTitle == "" {
		g.topTitle = title
	}
	if err := g.fields(dir, p, name, st, s); err != nil {
		return "", err
	}
	keyNames(s)
	return title, nil
}

// fields adds the keys of struct st (of type owner in package p) to s,
// those of embedded structs inline, as encoding/json decodes them.
func (g *gen) fields(dir string, p *pkgSrc, owner string, st *ast.StructType, s *Section) error {
	for _, f := range st.Fields.List {
		key, embedded := "", len(f.Names) == 0
		if f.Tag != nil {
			tag, _ := strconv.Unquote(f.Tag.Value)
			key, _, _ = strings.Cut(reflect.StructTag(tag).Get("json"), ",")
		}
		if key == "-" {
			continue
		}
		if embedded && key == "" {
			edir, ename, err := g.resolve(dir, p, owner, f.Type)
			if err != nil {
				return err
			}
			ep, err := g.load(edir)
			if err != nil {
				return err
			}
			est, ok := ep.types[ename].Type.(*ast.StructType)
			if !ok {
				return fmt.Errorf("%s.%s: embedded %s is not a struct", p.name, owner, ename)
			}
			if err := g.fields(edir, ep, ename, est, s); err != nil {
				return err
			}
			continue
		}
		for _, n := range f.Names {
			if !n.IsExported() {
				continue
			}
			k := key
			if k == "" {
				k = n.Name
			}
			doc := oneLine(f.Doc)
			if doc == "" {
				return fmt.Errorf("%s.%s.%s (key %q) has no doc comment: the reference takes each key's meaning from it", p.name, owner, n.Name, k)
			}
			typ, ref, suffix, err := g.describe(dir, p, owner, f.Type)
			if err != nil {
				return fmt.Errorf("%s.%s.%s: %w", p.name, owner, n.Name, err)
			}
			s.Fields = append(s.Fields, Field{Key: k, Type: typ, Doc: doc, Ref: ref, goName: n.Name})
			if ref != "" {
				g.refSuffix[s.Title+"."+k] = suffix
			}
		}
	}
	return nil
}

// keyNames writes the Go names of a struct's fields in its fields' docs
// as their keys: "at most MaxTTL" reads "at most `maxTTL`".
func keyNames(s *Section) {
	var pairs []string
	for _, f := range s.Fields {
		pairs = append(pairs, f.goName, "`"+f.Key+"`")
	}
	words := regexp.MustCompile(`[A-Za-z]+`)
	keys := map[string]string{}
	for i := 0; i+1 < len(pairs); i += 2 {
		keys[pairs[i]] = pairs[i+1]
	}
	for i := range s.Fields {
		s.Fields[i].Doc = words.ReplaceAllStringFunc(s.Fields[i].Doc, func(w string) string {
			if k, ok := keys[w]; ok {
				return k
			}
			return w
		})
	}
}

// typeDoc turns a type's doc comment ("Role is a template for ...") into
// a sentence about the thing ("A template for ...").
func typeDoc(doc, name string) string {
	for _, verb := range []string{" is ", " are "} {
		if rest, ok := strings.CutPrefix(doc, name+verb); ok && rest != "" {
			return strings.ToUpper(rest[:1]) + rest[1:]
		}
	}
	return doc
}

// describe says what a value of type expression e is, and which section
// describes its structure (with the key suffix between, for Keys).
func (g *gen) describe(dir string, p *pkgSrc, owner string, e ast.Expr) (typ, ref, suffix string, err error) {
	switch e := e.(type) {
	case *ast.StarExpr:
		return g.describe(dir, p, owner, e.X)
	case *ast.ArrayType:
		t, r, s, err := g.describe(dir, p, owner, e.Elt)
		return "list of " + t, r, ".[]" + s, err
	case *ast.MapType:
		if id, ok := e.Key.(*ast.Ident); !ok || id.Name != "string" {
			return "", "", "", errors.New("map keys other than string")
		}
		t, r, s, err := g.describe(dir, p, owner, e.Value)
		return "map of name to " + t, r, ".*" + s, err
	case *ast.Ident:
		switch e.Name {
		case "string":
			return "string", "", "", nil
		case "bool":
			return "boolean", "", "", nil
		case "int", "int32", "int64":
			return "integer", "", "", nil
		}
	}
	tdir, name, err := g.resolve(dir, p, owner, e)
	if err != nil {
		return "", "", "", err
	}
	tp, err := g.load(tdir)
	if err != nil {
		return "", "", "", err
	}
	if hasMethod(tp.methods[name], "UnmarshalJSON") {
		// A scalar that decodes itself: its doc says how it is written.
		doc := strings.TrimSuffix(typeDoc(tp.docs[name], name), ".")
		return "string: " + strings.ToLower(doc[:1]) + doc[1:], "", "", nil
	}
	title, err := g.section(tdir, name)
	if err != nil {
		return "", "", "", err
	}
	return "[" + title + "](#" + anchor(title) + ")", title, "", nil
}

func hasMethod(ms []string, m string) bool {
	for _, x := range ms {
		if x == m {
			return true
		}
	}
	return false
}

// resolve finds the package directory and name of a named type used in
// package p (in the file declaring owner).
func (g *gen) resolve(dir string, p *pkgSrc, owner string, e ast.Expr) (string, string, error) {
	switch e := e.(type) {
	case *ast.Ident:
		return dir, e.Name, nil
	case *ast.SelectorExpr:
		x, ok := e.X.(*ast.Ident)
		if !ok {
			break
		}
		path := p.imports[p.fileOf[owner]][x.Name]
		rel, ok := strings.CutPrefix(path, g.module+"/")
		if !ok {
			return "", "", fmt.Errorf("%s.%s: type of another module (%s)", x.Name, e.Sel.Name, path)
		}
		return rel, e.Sel.Name, nil
	}
	return "", "", fmt.Errorf("a type expression the reference cannot describe (%T)", e)
}

func anchor(title string) string {
	return strings.ToLower(strings.ReplaceAll(title, ".", ""))
}

func (g *gen) render(top string) []byte {
	var b bytes.Buffer
	w := bufio.NewWriter(&b)
	fmt.Fprintf(w, "<!-- Generated by `make docs` from the Go types (test/docs/backendsref); edit their doc comments, not this file. -->\n\n")
	fmt.Fprintf(w, "# The backend file (`backends.yaml`): reference\n\n")
	fmt.Fprintf(w, "%s\n\n", g.byTitle[top].Doc)
	fmt.Fprintf(w, "Unknown keys are refused (the keys match as `encoding/json` matches them, ignoring case). "+
		"Check a file before you install it: `ephemeral-secrets-csi check-config --side node|issuer|all FILE` "+
		"([configuration](configuration.md#checking-a-backend-file)). Examples: "+
		"[postgres](../examples/postgres/admin/backends.yaml), [vault](../examples/vault/admin/backends.yaml), "+
		"[aws](../examples/aws/admin/backends.yaml), [gcp](../examples/gcp/admin/backends.yaml).\n")
	for _, s := range g.sections {
		if s.Title == top {
			fmt.Fprintf(w, "\n## The file's sections\n\n")
		} else {
			fmt.Fprintf(w, "\n## %s\n\n%s\n\n", s.Title, s.Doc)
		}
		fmt.Fprintf(w, "| key | value | meaning |\n|---|---|---|\n")
		for _, f := range s.Fields {
			fmt.Fprintf(w, "| `%s` | %s | %s |\n", f.Key, cell(f.Type), cell(f.Doc))
		}
	}
	w.Flush()
	return b.Bytes()
}

// cell escapes what would end a table cell.
func cell(s string) string { return strings.ReplaceAll(s, "|", `\|`) }
