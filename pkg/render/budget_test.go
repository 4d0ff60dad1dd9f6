package render

import (
	"errors"
	"fmt"
	"runtime"
	"strings"
	"testing"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/ephemeral-secrets/csi-driver/pkg/storage"
)

// allocated runs f and returns the bytes it allocated on the heap.
func allocated(f func()) uint64 {
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	f()
	runtime.ReadMemStats(&after)
	return after.TotalAlloc - before.TotalAlloc
}

// Hostile templates stop within their budget, while they run: each case
// returns the expected error, and allocates a bounded amount of memory
// (the old code reached +689 MiB with printf widths and +373 MiB with 64
// files of 4 MiB; a range over 10^12 ran past every deadline).
func TestHostileTemplatesStopWithinBudget(t *testing.T) {
	double := `{{$a := printf "%s%s" .password .password}}` + strings.Repeat(`{{$a = printf "%s%s" $a $a}}`, 60) + `{{$a}}`
	var many strings.Builder
	for i := range MaxFiles {
		fmt.Fprintf(&many, "- {path: f%d, template: '{{printf \"%%01000000d\" 0}}{{printf \"%%01000000d\" 0}}{{printf \"%%01000000d\" 0}}{{printf \"%%01000000d\" 0}}'}\n", i)
	}
	for _, tc := range []struct {
		name, files string
		limits      Limits
		want        error
	}{
		{"nested ranges within each literal bound", `- {path: x, template: '{{range 100000}}{{range 100000}}{{range 100000}}{{end}}{{end}}{{end}}'}`, Limits{}, ErrBudget},
		{"range over a computed length", `- {path: x, template: '{{range $i, $v := .}}{{range (len (printf "%0900000d" 0))}}{{end}}{{end}}'}`, Limits{}, ErrBudget},
		{"printf doubling", "- {path: x, template: '" + double + "'}", Limits{}, storage.ErrTooLarge},
		{"println doubling", "- {path: x, template: '" + strings.ReplaceAll(strings.ReplaceAll(double, `printf "%s%s"`, "print"), "print $a $a", "println $a $a") + "'}", Limits{}, storage.ErrTooLarge},
		{"html expansion", "- {path: x, template: '" + strings.ReplaceAll(double, `printf "%s%s" $a $a`, `html (print $a $a "<<<<<<<<")`) + "'}", Limits{}, storage.ErrTooLarge},
		{"64 files of 4 MiB", many.String(), Limits{}, storage.ErrTooLarge},
		{"printf width from an argument", `- {path: x, template: '{{$f := print "%" "*d"}}{{printf $f 1000000000 0}}'}`, Limits{}, ErrInvalidSpec},
		{"printf width in a variable format", `- {path: x, template: '{{$f := print "%0" "999999999" "d"}}{{printf $f 0}}'}`, Limits{}, storage.ErrTooLarge},
		{"deadline", `- {path: x, template: '{{range 10}}x{{end}}'}`, Limits{Timeout: time.Nanosecond}, ErrBudget},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := ParseSpecWithin(map[string]string{FilesParam: tc.files}, tc.limits)
			if err != nil {
				t.Fatal(err)
			}
			var rerr error
			n := allocated(func() { _, rerr = s.Render(lease) })
			if !errors.Is(rerr, tc.want) {
				t.Fatalf("err = %v, want %v", rerr, tc.want)
			}
			if strings.Contains(rerr.Error(), "S3CRET") {
				t.Fatalf("error quotes a value: %v", rerr)
			}
			// The byte budget is 1 MiB of files and 4 MiB of intermediate
			// strings; fmt and the copies around it at most a few times that.
			t.Logf("allocated %.1f MiB", float64(n)/(1<<20))
			if n > 48<<20 {
				t.Errorf("allocated %d MiB", n>>20)
			}
		})
	}
}

// What can be refused before running is refused when the class is parsed,
// before any backend call.
func TestHostileTemplatesRefusedAtParse(t *testing.T) {
	for _, files := range []string{
		`- {path: x, template: '{{range 1000000000000}}{{end}}'}`,
		`- {path: x, template: '{{range $i := 1000000000000}}{{$i}}{{end}}'}`,
		`- {path: x, template: '{{if true}}{{range 100001}}{{end}}{{end}}'}`,
		`- {path: x, template: '{{printf "%099999999999d" 0}}'}`,
		`- {path: x, template: '{{printf "%.99999999999f" 1.0}}'}`,
		`- {path: x, template: '{{print (printf "%*d" 5 1)}}'}`,
	} {
		if _, err := ParseSpec(map[string]string{FilesParam: files}); !errors.Is(err, ErrInvalidSpec) {
			t.Errorf("%s: %v, want ErrInvalidSpec", files, err)
		}
	}
}

// Ordinary templates render as before, ranges and printf included.
func TestBoundedTemplatesStillRender(t *testing.T) {
	s, err := ParseSpec(map[string]string{FilesParam: `- {path: x, template: '{{range $k, $v := .}}{{if eq $k "username"}}{{printf "%-10s|" $v}}{{end}}{{end}}{{range 3}}.{{end}}{{printf "%5.1f" 2.25}}'}`})
	if err != nil {
		t.Fatal(err)
	}
	files, err := s.Render(lease)
	if err != nil {
		t.Fatal(err)
	}
	if got := string(files[0].Data); got != fmt.Sprintf("%-10s|...%5.1f", lease.Values["username"], 2.25) {
		t.Fatalf("rendered %q", got)
	}
}

// FuzzRenderIsBounded: whatever template a class holds, rendering it
// returns (a template that could run without end would hang the fuzzer)
// and never makes more than the byte cap.
func FuzzRenderIsBounded(f *testing.F) {
	f.Add(`{{range 100000}}{{range 100000}}{{end}}{{end}}`)
	f.Add(`{{$a := printf "%s%s" .password .password}}{{$a = printf "%s%s" $a $a}}{{$a = printf "%s%s" $a $a}}{{$a}}`)
	f.Add(`{{range $k, $v := .}}{{printf "%-9000s" $v}}{{html $v}}{{js $v}}{{urlquery $v}}{{end}}`)
	f.Add(`{{with .username}}{{range (len .)}}{{println .}}{{end}}{{end}}`)
	const maxBytes = 64 << 10
	f.Fuzz(func(t *testing.T, tmpl string) {
		files, err := yaml.Marshal([]map[string]string{{"path": "x", "template": tmpl}})
		if err != nil {
			return
		}
		s, err := ParseSpecWithin(map[string]string{FilesParam: string(files)}, Limits{MaxBytes: maxBytes, MaxSteps: 5000, Timeout: 50 * time.Millisecond})
		if err != nil {
			return
		}
		out, err := s.Render(lease)
		if err != nil {
			if strings.Contains(err.Error(), "S3CRET") {
				t.Fatalf("error quotes a value: %v", err)
			}
			return
		}
		if len(out[0].Data) > maxBytes {
			t.Fatalf("rendered %d bytes, cap %d", len(out[0].Data), maxBytes)
		}
	})
}
