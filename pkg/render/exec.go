package render

import (
	"errors"
	"fmt"
	"io"
	"sort"
	"strings"
	"text/template"
	"text/template/parse"
)

// A class's templates are parsed by text/template and run by the
// evaluator in this file, over the same parse tree.
//
// Why not text/template's Execute: its evaluator looks a field up as a
// method by name at run time (reflect's MethodByName), and a binary that
// can reach such a call keeps every exported method of every type it
// links, since the linker can no longer tell which are used. In the node
// plugin that was 3.6 MB of its 21.6 MB and 1.8 MiB of its 20 MiB resident,
// on every node. A template here only ever sees a lease's values (a map
// of strings), the constants it writes and what this package's functions
// return, none of which has a method, so nothing is lost: the evaluator
// follows text/template's rules (its documentation, and its exec.go and
// funcs.go, read to learn) for every value a template of ours can reach,
// and FuzzExecMatchesTextTemplate holds it to text/template's output.
//
// Values are plain Go values: string, bool, int (a number constant, len),
// float64, complex128, uint8 (a byte that index takes out of a string),
// map[string]string (the lease's values: dot at the top, a range's
// element) and nil (the nil constant, passed to a function that takes any).

// control is how a walk ended: at the end of its nodes, or at a break or
// continue inside a range.
type control int

const (
	ended control = iota
	broke
	continued
)

// execError is a failure of a template at a node; like text/template's
// ExecError it names the template, the place and the action.
type execError struct {
	name, location, context string
	err                     error
}

func (e *execError) Error() string {
	return fmt.Sprintf("template: %s: executing %q at <%s>: %v", e.location, e.name, e.context, e.err)
}

func (e *execError) Unwrap() error { return e.err }

// errMissingKey: a field names no value of the lease.
var errMissingKey = errors.New("map has no entry for key")

type variable struct {
	name  string
	value any
}

// function is one function a template can call: arity, how its arguments
// are taken and its body. A nil constant is an argument (nil) but where a
// string must be.
type function struct {
	min         int  // arguments it needs
	variadic    bool // more are allowed
	stringFirst bool // the first argument must be a string (printf's format)
	call        func(args []any) (any, error)
}

// evaluator runs one template over one lease's values.
type evaluator struct {
	name  string
	tree  *parse.Tree
	w     io.Writer
	funcs map[string]function
	vars  []variable
	node  parse.Node // the node at hand, for errors
}

// execute runs tree over data, writing to w, with the functions of budget r.
func executeTree(tree *parse.Tree, w io.Writer, data map[string]string, r *run) error {
	e := &evaluator{name: tree.ParseName, tree: tree, w: w, funcs: r.functions(), vars: []variable{{"$", data}}}
	_, err := e.walk(data, tree.Root)
	return err
}

func (e *evaluator) at(n parse.Node) { e.node = n }

// errorf is a failure at the node at hand; %w keeps what a function said
// (a budget, the byte cap) for errors.Is.
func (e *evaluator) errorf(format string, args ...any) error {
	err := fmt.Errorf(format, args...)
	if e.node == nil {
		return &execError{name: e.name, location: e.name, err: err}
	}
	location, context := e.tree.ErrorContext(e.node)
	return &execError{name: e.name, location: location, context: context, err: err}
}

func (e *evaluator) walk(dot any, n parse.Node) (control, error) {
	e.at(n)
	switch n := n.(type) {
	case *parse.ActionNode:
		v, err := e.pipeline(dot, n.Pipe)
		if err == nil && len(n.Pipe.Decl) == 0 {
			err = e.print(n, v)
		}
		return ended, err
	case *parse.BreakNode:
		return broke, nil
	case *parse.ContinueNode:
		return continued, nil
	case *parse.CommentNode:
		return ended, nil
	case *parse.IfNode:
		return e.ifOrWith(dot, &n.BranchNode, false)
	case *parse.WithNode:
		return e.ifOrWith(dot, &n.BranchNode, true)
	case *parse.ListNode:
		for _, c := range n.Nodes {
			if ctl, err := e.walk(dot, c); err != nil || ctl != ended {
				return ctl, err
			}
		}
		return ended, nil
	case *parse.RangeNode:
		return e.rangeOver(dot, n)
	case *parse.TextNode:
		_, err := e.w.Write(n.Text)
		return ended, err
	}
	return ended, e.errorf("%s is not allowed in a file's template", n)
}

// ifOrWith runs an if or a with: the variables its pipeline declares live
// until its end; with moves dot to the pipeline's value.
func (e *evaluator) ifOrWith(dot any, b *parse.BranchNode, with bool) (control, error) {
	defer e.pop(len(e.vars))
	v, err := e.pipeline(dot, b.Pipe)
	if err != nil {
		return ended, err
	}
	t, ok := truth(v)
	if !ok {
		return ended, e.errorf("if/with can't use %v", v)
	}
	switch {
	case t && with:
		return e.walk(v, b.List)
	case t:
		return e.walk(dot, b.List)
	case b.ElseList != nil:
		return e.walk(dot, b.ElseList)
	}
	return ended, nil
}

// rangeOver runs a range over a map (in key order), an integer n (0 to
// n-1) or nothing (nil: the else branch); anything else is an error.
func (e *evaluator) rangeOver(dot any, r *parse.RangeNode) (control, error) {
	defer e.pop(len(e.vars))
	val, err := e.pipeline(dot, r.Pipe)
	if err != nil {
		return ended, err
	}
	mark := len(e.vars) // the range's own variables are below it
	decl := r.Pipe.Decl
	// one runs the body once; declared variables take index and element
	// as text/template gives them (one variable: the element).
	one := func(index, elem any) (control, error) {
		defer e.pop(mark)
		var err error
		if len(decl) > 0 {
			switch {
			case r.Pipe.IsAssign && len(decl) > 1:
				err = e.set(decl[0].Ident[0], index)
			case r.Pipe.IsAssign:
				err = e.set(decl[0].Ident[0], elem)
			default:
				e.vars[len(e.vars)-1].value = elem
			}
		}
		if len(decl) > 1 && err == nil {
			if r.Pipe.IsAssign {
				err = e.set(decl[1].Ident[0], elem)
			} else {
				e.vars[len(e.vars)-2].value = index
			}
		}
		if err != nil {
			var none control
			return none, err
		}
		return e.walk(elem, r.List)
	}
	loop := func(n int, elem func(i int) (any, any)) (bool, error) {
		for i := range n {
			index, el := elem(i)
			ctl, err := one(index, el)
			if err != nil {
				return true, err
			}
			if ctl == broke {
				break
			}
		}
		return n > 0, nil
	}
	var ran bool
	switch v := val.(type) {
	case int, uint8:
		if len(decl) > 1 {
			return ended, e.errorf("can't use %v to iterate over more than one variable", v)
		}
		if n, isInt := v.(int); isInt {
			ran, err = loop(n, func(i int) (any, any) { return nil, i })
		} else {
			ran, err = loop(int(v.(uint8)), func(i int) (any, any) { return nil, uint8(i) })
		}
	case map[string]string:
		keys := make([]string, 0, len(v))
		for k := range v {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		ran, err = loop(len(keys), func(i int) (any, any) { return keys[i], v[keys[i]] })
	case nil:
	default:
		e.at(r)
		return ended, e.errorf("range can't iterate over %v", v)
	}
	if err != nil || ran {
		return ended, err
	}
	if r.ElseList != nil {
		return e.walk(dot, r.ElseList)
	}
	return ended, nil
}

// pipeline evaluates a pipeline: each command's value is the next one's
// last argument; its declarations are pushed (or, with =, assigned).
func (e *evaluator) pipeline(dot any, p *parse.PipeNode) (any, error) {
	if p == nil {
		return nil, nil
	}
	e.at(p)
	var v any
	var final *any // nil: no value from a previous command
	for _, c := range p.Cmds {
		var err error
		if v, err = e.command(dot, c, final); err != nil {
			return nil, err
		}
		final = &v
	}
	for _, d := range p.Decl {
		if p.IsAssign {
			if err := e.set(d.Ident[0], v); err != nil {
				return nil, err
			}
		} else {
			e.vars = append(e.vars, variable{d.Ident[0], v})
		}
	}
	return v, nil
}

func (e *evaluator) command(dot any, c *parse.CommandNode, final *any) (any, error) {
	switch n := c.Args[0].(type) {
	case *parse.FieldNode:
		e.at(n)
		return e.fieldChain(dot, n, n.Ident, c.Args, final)
	case *parse.ChainNode:
		return e.chain(dot, n, c.Args, final)
	case *parse.IdentifierNode:
		return e.call(dot, n, c.Args, final)
	case *parse.PipeNode: // parenthesized: the arguments are inside
		if err := e.notAFunction(c.Args, final); err != nil {
			return nil, err
		}
		return e.pipeline(dot, n)
	case *parse.VariableNode:
		return e.variable(n, c.Args, final)
	}
	e.at(c.Args[0])
	if err := e.notAFunction(c.Args, final); err != nil {
		return nil, err
	}
	switch n := c.Args[0].(type) {
	case *parse.BoolNode:
		return n.True, nil
	case *parse.DotNode:
		return dot, nil
	case *parse.NilNode:
		return nil, e.errorf("nil is not a command")
	case *parse.NumberNode:
		return e.constant(n)
	case *parse.StringNode:
		return n.Text, nil
	}
	return nil, e.errorf("can't evaluate command %q", c.Args[0])
}

func (e *evaluator) notAFunction(args []parse.Node, final *any) error {
	if len(args) > 1 || final != nil {
		return e.errorf("can't give argument to non-function %s", args[0])
	}
	return nil
}

// constant is a number constant's value, typed as text/template types it
// for an argument of type any: complex, float (written with a point or an
// exponent), else int.
func (e *evaluator) constant(n *parse.NumberNode) (any, error) {
	e.at(n)
	hexInt := len(n.Text) > 2 && n.Text[0] == '0' && (n.Text[1] == 'x' || n.Text[1] == 'X') && !strings.ContainsAny(n.Text, "pP")
	runeInt := n.Text != "" && n.Text[0] == '\''
	switch {
	case n.IsComplex:
		return n.Complex128, nil
	case n.IsFloat && !hexInt && !runeInt && strings.ContainsAny(n.Text, ".eEpP"):
		return n.Float64, nil
	case n.IsInt && int64(int(n.Int64)) == n.Int64:
		return int(n.Int64), nil
	}
	return nil, e.errorf("%s overflows int", n.Text)
}

// fieldChain looks up each field of idents in turn, from receiver; only
// a map has fields (its keys) and a missing key is an error.
func (e *evaluator) fieldChain(receiver any, node parse.Node, idents []string, args []parse.Node, final *any) (any, error) {
	for i, name := range idents {
		switch r := receiver.(type) {
		case map[string]string:
			if i == len(idents)-1 && (len(args) > 1 || final != nil) {
				return nil, e.errorf("%s is not a method but has arguments", name)
			}
			v, ok := r[name]
			if !ok {
				return nil, e.errorf("%w %q", errMissingKey, name)
			}
			receiver = v
		case nil:
			return nil, e.errorf("nil data; no entry for key %q", name)
		default:
			return nil, e.errorf("can't evaluate field %s in type %T", name, r)
		}
	}
	return receiver, nil
}

func (e *evaluator) chain(dot any, c *parse.ChainNode, args []parse.Node, final *any) (any, error) {
	e.at(c)
	if _, isNil := c.Node.(*parse.NilNode); isNil {
		return nil, e.errorf("indirection through explicit nil in %s", c)
	}
	v, err := e.arg(dot, c.Node)
	if err != nil {
		return nil, err
	}
	return e.fieldChain(v, c, c.Field, args, final)
}

func (e *evaluator) variable(n *parse.VariableNode, args []parse.Node, final *any) (any, error) {
	e.at(n)
	v, err := e.lookup(n.Ident[0])
	if err != nil {
		return nil, err
	}
	if len(n.Ident) == 1 {
		return v, e.notAFunction(args, final)
	}
	return e.fieldChain(v, n, n.Ident[1:], args, final)
}

// call calls the function n names with the arguments args[1:] (args is
// nil for a function named as an argument) and final last.
func (e *evaluator) call(dot any, n *parse.IdentifierNode, args []parse.Node, final *any) (any, error) {
	e.at(n)
	f, ok := e.funcs[n.Ident]
	if !ok {
		return nil, e.errorf("%q is not a defined function", n.Ident)
	}
	if args != nil {
		args = args[1:]
	}
	count := len(args)
	if final != nil {
		count++
	}
	switch {
	case f.variadic && count < f.min:
		return nil, e.errorf("wrong number of args for %s: want at least %d got %d", n.Ident, f.min, count)
	case !f.variadic && count != f.min:
		return nil, e.errorf("wrong number of args for %s: want %d got %d", n.Ident, f.min, count)
	}
	if n.Ident == "and" || n.Ident == "or" {
		// Arguments are evaluated until one decides: the first false
		// one (and) or true one (or), else the last.
		var v any
		for _, a := range args {
			var err error
			if v, err = e.arg(dot, a); err != nil {
				return nil, err
			}
			if t, _ := truth(v); t == (n.Ident == "or") {
				return v, nil
			}
		}
		if final != nil {
			v = *final
		}
		return v, nil
	}
	vals := make([]any, 0, count)
	for i, a := range args {
		var v any
		var err error
		if i == 0 && f.stringFirst {
			v, err = e.stringArg(dot, a)
		} else {
			v, err = e.arg(dot, a)
		}
		if err != nil {
			return nil, err
		}
		vals = append(vals, v)
	}
	if final != nil {
		if _, isString := (*final).(string); count == 1 && f.stringFirst && !isString {
			return nil, e.errorf("wrong type for value; expected string; got %T", *final)
		}
		vals = append(vals, *final)
	}
	v, err := f.call(vals)
	if err != nil {
		e.at(n)
		return nil, e.errorf("error calling %s: %w", n.Ident, err)
	}
	return v, nil
}

// arg evaluates an argument of a function that takes any (or, in
// text/template, a reflect.Value).
func (e *evaluator) arg(dot any, n parse.Node) (any, error) {
	e.at(n)
	switch n := n.(type) {
	case *parse.DotNode:
		return dot, nil
	case *parse.NilNode:
		return nil, nil
	case *parse.FieldNode:
		return e.fieldChain(dot, n, n.Ident, []parse.Node{n}, nil)
	case *parse.VariableNode:
		return e.variable(n, nil, nil)
	case *parse.PipeNode:
		return e.pipeline(dot, n)
	case *parse.IdentifierNode:
		return e.call(dot, n, nil, nil)
	case *parse.ChainNode:
		return e.chain(dot, n, nil, nil)
	case *parse.BoolNode:
		return n.True, nil
	case *parse.NumberNode:
		return e.constant(n)
	case *parse.StringNode:
		return n.Text, nil
	}
	return nil, e.errorf("can't handle %s for arg", n)
}

// stringArg evaluates an argument that must be a string: a string
// constant, or something whose value is a string.
func (e *evaluator) stringArg(dot any, n parse.Node) (any, error) {
	e.at(n)
	switch n := n.(type) {
	case *parse.StringNode:
		return n.Text, nil
	case *parse.NilNode:
		return nil, e.errorf("cannot assign nil to string")
	case *parse.DotNode, *parse.FieldNode, *parse.VariableNode, *parse.PipeNode, *parse.IdentifierNode, *parse.ChainNode:
		v, err := e.arg(dot, n)
		if err != nil {
			return nil, err
		}
		if _, ok := v.(string); !ok {
			return nil, e.errorf("wrong type for value; expected string; got %T", v)
		}
		return v, nil
	}
	return nil, e.errorf("expected string; found %s", n)
}

func (e *evaluator) print(n parse.Node, v any) error {
	e.at(n)
	if v == nil {
		v = "<no value>"
	}
	_, err := fmt.Fprint(e.w, v)
	return err
}

func (e *evaluator) lookup(name string) (any, error) {
	for i := len(e.vars) - 1; i >= 0; i-- {
		if e.vars[i].name == name {
			return e.vars[i].value, nil
		}
	}
	return nil, e.errorf("undefined variable: %s", name)
}

func (e *evaluator) set(name string, v any) error {
	for i := len(e.vars) - 1; i >= 0; i-- {
		if e.vars[i].name == name {
			e.vars[i].value = v
			return nil
		}
	}
	return e.errorf("undefined variable: %s", name)
}

func (e *evaluator) pop(mark int) { e.vars = e.vars[:mark] }

// truth is text/template's: false for false, zero, "", an empty map and
// nil; ok is false for a value that is neither.
func truth(v any) (t, ok bool) {
	switch v := v.(type) {
	case nil:
		return false, true
	case bool:
		return v, true
	case string:
		return v != "", true
	case map[string]string:
		return len(v) > 0, true
	case int:
		return v != 0, true
	case uint8:
		return v != 0, true
	case float64:
		return v != 0, true
	case complex128:
		return v != 0, true
	}
	return false, false
}

// functions are what a template can call under budget r: the builtins of
// text/template, with the string-making ones (print, printf, println,
// html, js, urlquery) counted against the budget, and the step counter
// that bound put into each range body.
func (r *run) functions() map[string]function {
	counted := func(f func(...any) string) function {
		return function{variadic: true, call: func(args []any) (any, error) {
			if err := r.step(); err != nil {
				return nil, err
			}
			if err := r.operands(args); err != nil {
				return nil, err
			}
			s := f(args...)
			return s, r.made(len(s))
		}}
	}
	return map[string]function{
		stepFunc:   {call: func([]any) (any, error) { return "", r.step() }},
		"print":    counted(fmt.Sprint),
		"println":  counted(fmt.Sprintln),
		"html":     counted(template.HTMLEscaper),
		"js":       counted(template.JSEscaper),
		"urlquery": counted(template.URLQueryEscaper),
		"printf": {min: 1, variadic: true, stringFirst: true, call: func(args []any) (any, error) {
			if err := r.step(); err != nil {
				return nil, err
			}
			format := args[0].(string)
			if err := checkFormat(format, r.left()); err != nil {
				return nil, err
			}
			if err := r.operands(args[1:]); err != nil {
				return nil, err
			}
			s := fmt.Sprintf(format, args[1:]...)
			return s, r.made(len(s))
		}},
		"and":   {min: 1, variadic: true}, // call handles and and or
		"or":    {min: 1, variadic: true},
		"not":   {min: 1, call: func(a []any) (any, error) { t, _ := truth(a[0]); return !t, nil }},
		"len":   {min: 1, call: length},
		"index": {min: 1, variadic: true, call: index},
		"slice": {min: 1, variadic: true, call: slice},
		"call": {min: 1, variadic: true, call: func(a []any) (any, error) {
			return nil, fmt.Errorf("non-function of type %T", a[0]) // a template's values hold no function
		}},
		"eq": {min: 1, variadic: true, call: eq},
		"ne": {min: 2, call: func(a []any) (any, error) { t, err := eq(a); return !t.(bool), err }},
		"lt": {min: 2, call: func(a []any) (any, error) { return lt(a[0], a[1]) }},
		"le": {min: 2, call: func(a []any) (any, error) { return le(a[0], a[1]) }},
		"gt": {min: 2, call: func(a []any) (any, error) { t, err := le(a[0], a[1]); return !t, err }},
		"ge": {min: 2, call: func(a []any) (any, error) { t, err := lt(a[0], a[1]); return !t, err }},
	}
}

func length(a []any) (any, error) {
	switch v := a[0].(type) {
	case string:
		return len(v), nil
	case map[string]string:
		return len(v), nil
	}
	return nil, fmt.Errorf("len of type %T", a[0])
}

// indexArg is an index into something of length n (n itself allowed, as
// a slice's end).
func indexArg(i any, n int) (int, error) {
	var x int
	switch i := i.(type) {
	case int:
		x = i
	case uint8:
		x = int(i)
	case nil:
		return 0, errors.New("cannot index slice/array with nil")
	default:
		return 0, fmt.Errorf("cannot index slice/array with type %T", i)
	}
	if x < 0 || x > n {
		return 0, fmt.Errorf("index out of range: %d", x)
	}
	return x, nil
}

func index(a []any) (any, error) {
	item := a[0]
	if item == nil {
		return nil, errors.New("index of untyped nil")
	}
	for _, i := range a[1:] {
		switch it := item.(type) {
		case string:
			x, err := indexArg(i, len(it))
			if err != nil {
				return nil, err
			}
			if x == len(it) {
				return nil, fmt.Errorf("index out of range: %d", x)
			}
			item = it[x]
		case map[string]string:
			key, ok := i.(string)
			if !ok {
				return nil, fmt.Errorf("value has type %T; should be string", i)
			}
			item = it[key] // a missing key is the zero value
		default:
			return nil, fmt.Errorf("can't index item of type %T", item)
		}
	}
	return item, nil
}

func slice(a []any) (any, error) {
	s, ok := a[0].(string)
	switch {
	case a[0] == nil:
		return nil, errors.New("slice of untyped nil")
	case len(a) > 4:
		return nil, fmt.Errorf("too many slice indexes: %d", len(a)-1)
	case !ok:
		return nil, fmt.Errorf("can't slice item of type %T", a[0])
	case len(a) == 4:
		return nil, errors.New("cannot 3-index slice a string")
	}
	idx := [2]int{0, len(s)}
	for i, x := range a[1:] {
		var err error
		if idx[i], err = indexArg(x, len(s)); err != nil {
			return nil, err
		}
	}
	if idx[0] > idx[1] {
		return nil, fmt.Errorf("invalid slice index: %d > %d", idx[0], idx[1])
	}
	return s[idx[0]:idx[1]], nil
}

// kind is a value's class for comparisons.
type kind int

const (
	invalidKind kind = iota
	boolKind
	complexKind
	intKind
	floatKind
	stringKind
	uintKind
)

func kindOf(v any) kind {
	switch v.(type) {
	case bool:
		return boolKind
	case int:
		return intKind
	case uint8:
		return uintKind
	case float64:
		return floatKind
	case complex128:
		return complexKind
	case string:
		return stringKind
	}
	return invalidKind
}

var (
	errBadComparisonType = errors.New("invalid type for comparison")
	errBadComparison     = errors.New("incompatible types for comparison")
)

// eq reports whether a[0] equals any of a[1:]; an int and a byte compare
// by value, other kinds only with their own.
func eq(a []any) (any, error) {
	if len(a) == 1 {
		return false, errors.New("missing argument for comparison")
	}
	x := a[0]
	kx := kindOf(x)
	for _, y := range a[1:] {
		ky := kindOf(y)
		switch {
		case kx == intKind && ky == uintKind:
			if x.(int) >= 0 && x.(int) == int(y.(uint8)) {
				return true, nil
			}
		case kx == uintKind && ky == intKind:
			if y.(int) >= 0 && int(x.(uint8)) == y.(int) {
				return true, nil
			}
		case kx != ky:
			if x != nil && y != nil {
				return false, errBadComparison
			}
		case kx == invalidKind && x == nil && y == nil:
			return true, nil
		case kx == invalidKind && (x == nil || y == nil):
		case kx == invalidKind:
			return false, errBadComparisonType // maps do not compare
		default:
			if x == y {
				return true, nil
			}
		}
	}
	return false, nil
}

func lt(x, y any) (bool, error) {
	kx, ky := kindOf(x), kindOf(y)
	switch {
	case kx == invalidKind || ky == invalidKind:
		return false, errBadComparisonType
	case kx == intKind && ky == uintKind:
		return x.(int) < int(y.(uint8)), nil
	case kx == uintKind && ky == intKind:
		return int(x.(uint8)) < y.(int), nil
	case kx != ky:
		return false, errBadComparison
	}
	switch x := x.(type) {
	case int:
		return x < y.(int), nil
	case uint8:
		return x < y.(uint8), nil
	case float64:
		return x < y.(float64), nil
	case string:
		return x < y.(string), nil
	}
	return false, errBadComparisonType // bool, complex
}

func le(x, y any) (bool, error) {
	if t, err := lt(x, y); t || err != nil {
		return t, err
	}
	t, err := eq([]any{x, y})
	return t.(bool), err
}
