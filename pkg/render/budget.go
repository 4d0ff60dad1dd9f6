package render

import (
	"bytes"
	"errors"
	"fmt"
	"text/template/parse"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/storage"
)

// Limits bound what rendering one volume's files may cost. A class's
// templates are the tenant's code running in the privileged driver; these
// bounds hold while they run, not after.
//
// A template (parsed by text/template, run by this package's evaluator,
// exec.go) cannot be cancelled, so the bounds are built into what it can
// do: every range body starts with a call to a step counter
// (inserted into the parse tree), every function that makes a string
// (print, printf, println, html, js, urlquery) is replaced by one that
// counts a step, refuses a printf width or precision larger than the
// bytes left and charges what it made, and the output writer fails past
// the volume's size cap. Between two checks a template can do only a
// bounded amount of work, so it stops within its budget on its own thread,
// and no goroutine is left running. Templates cannot call templates
// (refused at parse), so there is no recursion.
type Limits struct {
	// MaxBytes caps the total size of all of a volume's files (default
	// 1 MiB, the volume's own cap). Past it: storage.ErrTooLarge.
	MaxBytes int64
	// MaxSteps caps range iterations and function calls of all of a
	// volume's templates together (default 100 000). Past it: ErrInvalidSpec.
	MaxSteps int64
	// Timeout caps the time of rendering a volume (default 1 s). Past it:
	// ErrInvalidSpec.
	Timeout time.Duration
	// MaxTasks caps the live task leases of one volume a class may allow
	// (default 16).
	MaxTasks int
}

// Default limits.
const (
	DefaultMaxBytes = 1 << 20
	DefaultMaxSteps = 100_000
	DefaultTimeout  = time.Second
)

func (l Limits) withDefaults() Limits {
	if l.MaxBytes <= 0 {
		l.MaxBytes = DefaultMaxBytes
	}
	if l.MaxSteps <= 0 {
		l.MaxSteps = DefaultMaxSteps
	}
	if l.Timeout <= 0 {
		l.Timeout = DefaultTimeout
	}
	if l.MaxTasks <= 0 {
		l.MaxTasks = DefaultMaxTasksCap
	}
	return l
}

// ErrBudget means a template ran out of steps or time.
var ErrBudget = errors.New("template exceeds its budget")

// errBytes marks running out of bytes inside template execution, where
// the error is wrapped by text/template.
var errBytes = errors.New("output exceeds the volume's size cap")

// run is the budget of one Render: shared by all files of the volume.
type run struct {
	limits   Limits
	deadline time.Time
	out      int64 // bytes written to files
	work     int64 // bytes made by functions: at most 4 × MaxBytes
	steps    int64
}

func newRun(l Limits) *run {
	return &run{limits: l, deadline: time.Now().Add(l.Timeout)}
}

// step counts one range iteration or function call.
func (r *run) step() error {
	r.steps++
	if r.steps > r.limits.MaxSteps {
		return fmt.Errorf("%w of %d steps (range iterations and function calls)", ErrBudget, r.limits.MaxSteps)
	}
	if time.Now().After(r.deadline) {
		return fmt.Errorf("%w of %s", ErrBudget, r.limits.Timeout)
	}
	return nil
}

// made charges n bytes a function built.
func (r *run) made(n int) error {
	r.work += int64(n)
	if r.work > 4*r.limits.MaxBytes {
		return errBytes
	}
	return nil
}

// wrote charges n bytes of file content.
func (r *run) wrote(n int) error {
	r.out += int64(n)
	if r.out > r.limits.MaxBytes {
		return errBytes
	}
	return nil
}

// left is how many bytes one function call may still make.
func (r *run) left() int64 { return 4*r.limits.MaxBytes - r.work }

// operands refuses a call of a string-making function (print, printf,
// println, html, js, urlquery) whose operands alone hold more bytes than
// the budget has left: fmt builds the whole string before it can be
// charged, and the same 1 MB value named 4 000 times in one call would be
// 4 GB. What a call then builds is at most a few times what is left (the
// escapers' expansion, printf's widths: checkFormat).
func (r *run) operands(args []any) error {
	var n int64
	for _, a := range args {
		switch v := a.(type) {
		case string:
			n += int64(len(v))
		case []byte:
			n += int64(len(v))
		case map[string]string:
			for k, x := range v {
				n += int64(len(k) + len(x))
			}
		}
		if n > r.left() {
			return fmt.Errorf("%w: the operands of one call hold more than the %d bytes left", errBytes, r.left())
		}
	}
	return nil
}

// writer is a template's output: it fails past the byte budget, and
// checks the deadline.
type writer struct {
	bytes.Buffer
	r *run
}

func (w *writer) Write(p []byte) (int, error) {
	if err := w.r.wrote(len(p)); err != nil {
		return 0, err
	}
	if time.Now().After(w.r.deadline) {
		return 0, fmt.Errorf("%w of %s", ErrBudget, w.r.limits.Timeout)
	}
	return w.Buffer.Write(p)
}

// stepFunc is the name of the step counter inserted into range bodies.
const stepFunc = "esc_step"

// checkFormat refuses a printf format whose widths and precisions, all
// of its directives together, could make fmt build more than max bytes
// before anyone sees them, and "*" widths, whose value comes from an
// argument.
func checkFormat(format string, max int64) error {
	var total int64
	for i := 0; i < len(format); i++ {
		if format[i] != '%' {
			continue
		}
		for i++; i < len(format); i++ {
			c := format[i]
			if c == '*' {
				return fmt.Errorf("%w: printf: widths from arguments (*) are not allowed", ErrInvalidSpec)
			}
			if c >= '1' && c <= '9' {
				var n int64
				for ; i < len(format) && format[i] >= '0' && format[i] <= '9'; i++ {
					if n = n*10 + int64(format[i]-'0'); total+n > max {
						return fmt.Errorf("%w: printf: widths and precisions of more than %d bytes", errBytes, max)
					}
				}
				total += n
				i--
				continue
			}
			if c == '%' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' {
				break // the verb ends the directive
			}
		}
	}
	return nil
}

// bound prepares a parsed template for budgeted execution: it refuses
// what can be refused before running (a range over an integer literal
// beyond the step budget, a literal printf format beyond the byte budget)
// and inserts the step counter at the top of every range body.
func bound(n parse.Node, l Limits) error {
	switch n := n.(type) {
	case *parse.ListNode:
		if n == nil {
			return nil
		}
		for _, c := range n.Nodes {
			if err := bound(c, l); err != nil {
				return err
			}
		}
	case *parse.ActionNode:
		return boundPipe(n.Pipe, l)
	case *parse.IfNode:
		return boundBranch(&n.BranchNode, l)
	case *parse.WithNode:
		return boundBranch(&n.BranchNode, l)
	case *parse.RangeNode:
		if n.Pipe != nil && len(n.Pipe.Cmds) == 1 && len(n.Pipe.Cmds[0].Args) == 1 {
			if num, ok := n.Pipe.Cmds[0].Args[0].(*parse.NumberNode); ok && num.IsInt && num.Int64 > l.MaxSteps {
				return fmt.Errorf("%w: range over %d exceeds the budget of %d steps", ErrInvalidSpec, num.Int64, l.MaxSteps)
			}
		}
		if n.List == nil {
			n.List = &parse.ListNode{NodeType: parse.NodeList, Pos: n.Pos}
		}
		tick := &parse.ActionNode{NodeType: parse.NodeAction, Pos: n.Pos, Line: n.Line, Pipe: &parse.PipeNode{
			NodeType: parse.NodePipe, Pos: n.Pos, Line: n.Line, Cmds: []*parse.CommandNode{{
				NodeType: parse.NodeCommand, Pos: n.Pos,
				Args: []parse.Node{&parse.IdentifierNode{NodeType: parse.NodeIdentifier, Pos: n.Pos, Ident: stepFunc}},
			}},
		}}
		if err := boundBranch(&n.BranchNode, l); err != nil {
			return err
		}
		n.List.Nodes = append([]parse.Node{tick}, n.List.Nodes...)
	}
	return nil
}

func boundBranch(b *parse.BranchNode, l Limits) error {
	if err := boundPipe(b.Pipe, l); err != nil {
		return err
	}
	if err := bound(b.List, l); err != nil {
		return err
	}
	return bound(b.ElseList, l)
}

// boundPipe checks the literal formats of printf calls in a pipeline.
func boundPipe(p *parse.PipeNode, l Limits) error {
	if p == nil {
		return nil
	}
	for _, c := range p.Cmds {
		for i, a := range c.Args {
			switch a := a.(type) {
			case *parse.IdentifierNode:
				if a.Ident == "printf" && i+1 < len(c.Args) {
					if s, ok := c.Args[i+1].(*parse.StringNode); ok {
						if err := checkFormat(s.Text, 4*l.MaxBytes); errors.Is(err, ErrInvalidSpec) {
							return err
						} else if err != nil {
							return fmt.Errorf("%w: %w", ErrInvalidSpec, err)
						}
					}
				}
			case *parse.PipeNode:
				if err := boundPipe(a, l); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// sizeError is the error of running out of bytes, for files[i].
func sizeError(path string, l Limits) error {
	return fmt.Errorf("%w: %s: the files would exceed %d bytes", storage.ErrTooLarge, path, l.MaxBytes)
}
