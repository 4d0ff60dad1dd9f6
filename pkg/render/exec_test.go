package render

import (
	"errors"
	"fmt"
	"runtime"
	"strings"
	"testing"
	"text/template"
	"time"

	"sigs.k8s.io/yaml"
)

// referenceFuncs are the functions text/template's own Execute runs a
// template with under budget r (what render used before it had its own
// evaluator): the string-making builtins replaced by counted ones, and the
// step counter. The reference of the differential tests below.
func referenceFuncs(r *run) template.FuncMap {
	counted := func(f func(...any) string) func(...any) (string, error) {
		return func(args ...any) (string, error) {
			if err := r.step(); err != nil {
				return "", err
			}
			if err := r.operands(args); err != nil {
				return "", err
			}
			s := f(args...)
			return s, r.made(len(s))
		}
	}
	return template.FuncMap{
		stepFunc:   func() (string, error) { return "", r.step() },
		"print":    counted(fmt.Sprint),
		"println":  counted(fmt.Sprintln),
		"html":     counted(template.HTMLEscaper),
		"js":       counted(template.JSEscaper),
		"urlquery": counted(template.URLQueryEscaper),
		"printf": func(format string, args ...any) (string, error) {
			if err := r.step(); err != nil {
				return "", err
			}
			if err := checkFormat(format, r.left()); err != nil {
				return "", err
			}
			if err := r.operands(args); err != nil {
				return "", err
			}
			s := fmt.Sprintf(format, args...)
			return s, r.made(len(s))
		},
	}
}

// execData are the values the differential tests render: names that are
// identifiers and one that is not, numbers as strings, an empty value.
var execData = map[string]string{
	"username": "app-7f3a", "password": "pw'\"<&>", "host": "db.example", "port": "5432",
	"empty": "", "a-b": "dash", "lease_id": "L1",
}

// execCases are templates that reach every node, function and kind of
// value a file's template can, good and bad.
var execCases = []string{
	`{{.username}}`, `{{ .nope }}`, `{{.}}`, `{{$}}`, `{{$.username}}`, `{{$.nope}}`, `{{index . "a-b"}}`,
	`{{range $k, $v := .}}{{$k}}={{$v}};{{end}}`, `{{range .}}{{.}}{{end}}`, `{{range $v := .}}{{$v}}{{end}}`,
	`{{range 3}}{{.}}{{end}}`, `{{range $i := 3}}{{$i}}{{end}}`, `{{range $i, $v := 3}}{{end}}`,
	`{{range 0}}x{{else}}empty{{end}}`, `{{range -1}}x{{else}}neg{{end}}`, `{{range .username}}{{end}}`,
	`{{range $k, $v := .}}{{if eq $k "port"}}{{break}}{{end}}{{$k}}{{end}}`,
	`{{range $k, $v := .}}{{if eq $k "port"}}{{continue}}{{end}}{{$k}}{{end}}`,
	`{{range $k, $v := .}}{{range $i := 2}}{{$k}}{{$i}}{{end}}{{end}}`, `{{range $k, $v := .}}{{$k}}{{else}}none{{end}}`,
	`{{range (index .username 0)}}{{.}},{{end}}`, `{{range $i, $c := .username}}{{end}}`, `{{$x := 3}}{{range $x}}{{.}}{{end}}`,
	`{{range $k, $v := .}}{{$.port}}{{end}}`, `{{$k := 0}}{{range $k = 2}}{{$k}}{{end}}{{$k}}`,
	`{{$k := 0}}{{$v := 0}}{{range $k, $v = .}}{{end}}{{$k}}{{$v}}`, `{{range 1.5}}{{end}}`, `{{range true}}{{end}}`,
	`{{if .empty}}a{{else if .username}}b{{else}}c{{end}}`, `{{with .empty}}a{{else with .username}}{{.}}{{end}}`,
	`{{with $x := .username}}{{$x}}{{.}}{{end}}`, `{{with $x := 0}}{{else}}{{$x}}{{end}}`, `{{with 0}}x{{else}}{{.}}{{end}}`,
	`{{if 1.5}}y{{end}}`, `{{if 0i}}y{{else}}n{{end}}`, `{{if .}}y{{end}}`, `{{if print}}y{{else}}n{{end}}`,
	`{{$x := 1}}{{$x = 2}}{{$x}}`, `{{$x := .username}}{{range 2}}{{$x = print $x .}}{{end}}{{$x}}`,
	`{{printf "%s:%s" .host .port}}`, `{{printf "%d" 3}}`, `{{printf "%v" 1.5}}`, `{{printf "%q" .password}}`,
	`{{printf 3}}`, `{{printf .}}`, `{{printf nil}}`, `{{"%s" | printf}}`, `{{3 | printf}}`, `{{.username | printf "%s!"}}`,
	`{{printf "%05d|%-6s|%x" 3 "ab" "hi"}}`, `{{printf "%v %v" . 1i}}`, `{{printf (print "%" "d") 7}}`,
	`{{print nil}}`, `{{print 1 2 "a" "b" true}}`, `{{println .username 3}}`, `{{print}}`,
	`{{html "<a>"}}`, `{{js "'x'"}}`, `{{urlquery "a b&c"}}`, `{{.password | html}}`, `{{html 1 "<"}}`,
	`{{len .username}}`, `{{len .}}`, `{{len 3}}`, `{{len (print 1 2)}}`, `{{print .username | len}}`,
	`{{index . "username"}}`, `{{index . "missing"}}`, `{{index .username 0}}`, `{{index .username 99}}`,
	`{{index .username 8}}`, `{{index .username 7}}`, `{{index . 1}}`, `{{index 3 1}}`, `{{index .username}}`,
	`{{index nil}}`, `{{index "abc" 1 0}}`, `{{index "abc" -1}}`, `{{index "abc" (index "abc" 0)}}`,
	`{{slice .username 1 3}}`, `{{slice .username 2}}`, `{{slice .username}}`, `{{slice .username 3 1}}`,
	`{{slice .username 1 2 3}}`, `{{slice .username 1 2 3 4}}`, `{{slice . 1}}`, `{{slice .username 9}}`,
	`{{eq .port "5432"}}`, `{{eq 1 1}}`, `{{eq 1 2 1}}`, `{{eq 1 "1"}}`, `{{eq 1 1.0}}`, `{{eq . .}}`, `{{eq 1}}`,
	`{{eq "a" "b" "a"}}`, `{{eq (index .username 0) 97}}`, `{{eq 97 (index .username 0)}}`, `{{eq -1 (index .username 0)}}`,
	`{{eq 1i 1i}}`, `{{eq true true}}`, `{{eq 1 .}}`, `{{eq 1 2 "x"}}`,
	`{{ne 1 2}}`, `{{ne . .}}`, `{{ne 1 "a"}}`, `{{lt 1 2}}`, `{{lt "a" "b"}}`, `{{lt true false}}`, `{{lt 1i 2i}}`,
	`{{le 2 2}}`, `{{gt 2.5 1.5}}`, `{{ge 1 2}}`, `{{lt 1 2.0}}`, `{{lt . 1}}`, `{{le "b" "a"}}`,
	`{{lt (index .username 0) 200}}`, `{{lt -1 (index .username 0)}}`, `{{lt (index .username 0) -1}}`,
	`{{lt (index .username 0) (index .username 1)}}`, `{{gt (index .username 0) 3}}`,
	`{{and 1 0}}`, `{{and 1 2}}`, `{{or 0 ""}}`, `{{or 0 .username}}`, `{{and .empty .nope}}`, `{{or .username .nope}}`,
	`{{not .empty}}`, `{{not 1}}`, `{{not .}}`, `{{.username | and 1}}`, `{{0 | or 0}}`, `{{and 1 nil}}`, `{{or 0 (len 3)}}`,
	`{{call .username}}`, `{{call .username 1}}`,
	`{{1}}`, `{{1.5}}`, `{{1e3}}`, `{{0x10}}`, `{{0x1p4}}`, `{{'a'}}`, `{{1i}}`, `{{true}}`, `{{nil}}`, `{{"s"}}`, "{{`raw`}}",
	`{{99999999999999999999}}`, `{{-5}}`, `{{1_000}}`,
	`{{.username.x}}`, `{{(print .username).x}}`, `{{(index . "username")}}`, `{{(.).username}}`, `{{$.username.x}}`,
	`{{.username 1}}`, `{{1 | .username}}`, `{{. 1}}`, `{{"a" | print "b"}}`, `{{3 | printf "%d %d" 4}}`, `{{1 | $}}`,
	`{{(1) 2}}`, `{{$x := 1}}{{$x 2}}`, `{{"a" | "b"}}`,
	`{{eq nil nil}}`, `{{eq . nil}}`, `{{eq nil .}}`, `{{eq nil . 1}}`, `{{ne . nil}}`, `{{eq nil 1}}`, `{{eq 1 nil}}`, `{{ne nil nil}}`, `{{lt nil 1}}`, `{{not nil}}`, `{{len nil}}`,
	`{{slice nil}}`, `{{or nil}}`, `{{call nil}}`, `{{index . nil}}`, `{{index "abc" nil}}`, `{{print nil 1}}`,
	`{{range (and nil)}}x{{else}}e{{end}}`, `{{with (or nil)}}x{{else}}e{{end}}`, `{{$x := and nil}}{{$x}}`,
	`{{(and nil).x}}`, `{{and 1 nil}}`, `{{if and nil 1}}x{{end}}`, `{{printf "%v" nil}}`, `{{printf (or nil) 1}}`,
	`{{/* comment */}}x`, `{{- .username -}} y`, "a\n{{.port}}\n",
}

// ran is what one run of a template made: its output, or its error.
type ran struct {
	out string
	err error
}

// runBoth runs tmpl (as a class's file template, bounded by l) with this
// package's evaluator and with text/template's Execute; ok is false when
// the template does not parse as a file's template.
func runBoth(tmpl string, l Limits) (ours, ref ran, ok bool) {
	files, err := yaml.Marshal([]map[string]string{{"path": "x", "template": tmpl}})
	if err != nil {
		return ran{}, ran{}, false
	}
	s, err := ParseSpecWithin(map[string]string{FilesParam: string(files)}, l)
	if err != nil {
		return ran{}, ran{}, false
	}
	tree := s.Files[0].tmpl
	r := newRun(s.limits)
	w := &writer{r: r}
	ours.err = executeTree(tree.Tree, w, execData, r)
	ours.out = w.String()

	r = newRun(s.limits)
	w = &writer{r: r}
	clone, err := tree.Clone()
	if err != nil {
		return ran{}, ran{}, false
	}
	ref.err = clone.Funcs(referenceFuncs(r)).Execute(w, execData)
	ref.out = w.String()
	return ours, ref, true
}

// differ says how ours differs from text/template's run, or "".
func differ(ours, ref ran) string {
	switch {
	case (ours.err == nil) != (ref.err == nil):
		return fmt.Sprintf("error %v, text/template's %v (outputs %q and %q)", ours.err, ref.err, ours.out, ref.out)
	case ours.err == nil && ours.out != ref.out:
		return fmt.Sprintf("output %q, text/template's %q", ours.out, ref.out)
	case errors.Is(ours.err, ErrBudget) != errors.Is(ref.err, ErrBudget), errors.Is(ours.err, errBytes) != errors.Is(ref.err, errBytes):
		return fmt.Sprintf("error %v, text/template's %v: not the same budget", ours.err, ref.err)
	case ours.err != nil && strings.Contains(ref.err.Error(), "map has no entry for key") &&
		templateError(ours.err).Error() != missingKey(ref.err):
		return fmt.Sprintf("says %q, text/template %q", templateError(ours.err), missingKey(ref.err))
	}
	return ""
}

// missingKey is what render said of text/template's error for a missing
// key: the error past its "template: " prefix.
func missingKey(err error) string {
	var ee template.ExecError
	if !errors.As(err, &ee) {
		return err.Error()
	}
	msg := ee.Err.Error()
	return msg[strings.Index(msg, ": ")+2:]
}

// The evaluator renders what text/template's Execute renders, and fails
// where it fails, for every case.
func TestExecMatchesTextTemplate(t *testing.T) {
	parsed := 0
	for _, tmpl := range execCases {
		ours, ref, ok := runBoth(tmpl, Limits{})
		if !ok {
			continue
		}
		parsed++
		if d := differ(ours, ref); d != "" {
			t.Errorf("%s: %s", tmpl, d)
		}
	}
	if parsed < len(execCases)*9/10 {
		t.Fatalf("only %d of %d cases parse: the table is stale", parsed, len(execCases))
	}
}

// The budget holds in the evaluator as it did in text/template: the same
// steps, the same bytes, the same errors.
func TestExecKeepsTheBudget(t *testing.T) {
	for _, tc := range []struct {
		tmpl string
		want error
	}{
		{`{{range 999}}{{range 999}}{{end}}{{end}}`, ErrBudget},
		{`{{range $k, $v := .}}{{range 300}}{{print 1}}{{end}}{{end}}`, ErrBudget},
		{`{{range 100}}{{printf "%0900d" 0}}{{end}}`, errBytes},
	} {
		ours, ref, ok := runBoth(tc.tmpl, Limits{MaxSteps: 1000, MaxBytes: 64 << 10, Timeout: time.Minute})
		if !ok {
			t.Fatalf("%s does not parse", tc.tmpl)
		}
		if !errors.Is(ours.err, tc.want) {
			t.Errorf("%s: %v, want %v", tc.tmpl, ours.err, tc.want)
		}
		if d := differ(ours, ref); d != "" {
			t.Errorf("%s: %s", tc.tmpl, d)
		}
	}
}

// FuzzExecMatchesTextTemplate: whatever a class's template is, the
// evaluator renders and fails as text/template's Execute does (with a
// small budget, so that both stop soon).
func FuzzExecMatchesTextTemplate(f *testing.F) {
	for _, tmpl := range execCases {
		f.Add(tmpl)
	}
	f.Fuzz(func(t *testing.T, tmpl string) {
		if len(tmpl) > 512 {
			return
		}
		ours, ref, ok := runBoth(tmpl, Limits{MaxSteps: 1000, MaxBytes: 64 << 10, Timeout: time.Minute})
		if !ok {
			return
		}
		if d := differ(ours, ref); d != "" {
			t.Errorf("%s: %s", tmpl, d)
		}
	})
}

// One call cannot build far past the budget before it is charged: its
// operands count first (the same value named a thousand times), and a
// format's widths count all together (each under the budget, a hundred of
// them over it). Both are refused before fmt builds anything.
func TestOneCallCannotBuildPastTheBudget(t *testing.T) {
	many := func(n int, s string) string { return strings.Repeat(s, n) }
	for _, tmpl := range []string{
		`{{$x := printf "%60000s" ""}}{{print` + many(2000, " $x") + `}}`,
		`{{$x := printf "%60000s" ""}}{{html` + many(2000, " $x") + `}}`,
		`{{$x := printf "%60000s" ""}}{{printf "%.0s"` + many(2000, " $x") + `}}`,
		`{{$f := print "` + many(100, "%200000s") + `"}}{{printf $f}}`,
	} {
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		ours, ref, ok := runBoth(tmpl, Limits{MaxSteps: 1000, MaxBytes: 64 << 10, Timeout: time.Minute})
		runtime.ReadMemStats(&after)
		if !ok {
			t.Fatalf("%.60s… does not parse", tmpl)
		}
		if !errors.Is(ours.err, errBytes) {
			t.Errorf("%.60s…: %v, want %v", tmpl, ours.err, errBytes)
		}
		if d := differ(ours, ref); d != "" {
			t.Errorf("%.60s…: %s", tmpl, d)
		}
		// Both runs together: the budget is 256 KiB of work each.
		if got := after.TotalAlloc - before.TotalAlloc; got > 16<<20 {
			t.Errorf("%.60s…: %d MB allocated, want the call refused before it builds", tmpl, got>>20)
		}
	}
}

// A template that assigns to a variable it never declared fails, as in
// text/template (the parser lets some through: $0).
func TestExecAssignsOnlyDeclaredVariables(t *testing.T) {
	ours, ref, ok := runBoth(`{{$0 =00}}`, Limits{MaxSteps: 1000, MaxBytes: 64 << 10, Timeout: time.Minute})
	if !ok {
		t.Skip("the parser refuses it")
	}
	if ours.err == nil {
		t.Errorf("assigning an undeclared variable rendered %q", ours.out)
	}
	if d := differ(ours, ref); d != "" {
		t.Error(d)
	}
}
