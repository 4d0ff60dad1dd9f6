package render

import (
	"encoding/json"
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
	"github.com/ephemeral-secrets/csi-driver/pkg/storage"
	"github.com/ephemeral-secrets/csi-driver/pkg/volumepath"
)

var lease = provider.Lease{
	ID:        "shop-web-0-abcdefgh",
	Values:    map[string]string{"username": "esc_user", "password": "S3CRET'PASS"},
	Info:      map[string]string{"host": "db.example", "port": "5432", "database": "shop"},
	ExpiresAt: time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC),
}

func files(t *testing.T, params map[string]string) map[string]storage.File {
	t.Helper()
	s, err := ParseSpec(params)
	if err != nil {
		t.Fatal(err)
	}
	out, err := s.Render(lease)
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]storage.File{}
	for _, f := range out {
		m[f.Path] = f
	}
	return m
}

func TestDefaultLayoutIsOneFilePerValue(t *testing.T) {
	m := files(t, nil)
	if len(m) != 2 || string(m["username"].Data) != "esc_user" || m["password"].Mode != 0o440 {
		t.Fatalf("%+v", m)
	}
	m = files(t, map[string]string{FileModeParam: "0444"})
	if m["password"].Mode != 0o444 {
		t.Fatalf("fileMode ignored: %o", m["password"].Mode)
	}
}

func TestFilesParameter(t *testing.T) {
	m := files(t, map[string]string{FilesParam: `
- path: dsn
  template: "postgres://{{ .username }}@{{ .host }}:{{ .port }}/{{ .database }}"
- path: env/pg.env
  format: env
  mode: "0400"
- path: creds.json
  format: json
- path: user
  value: username
- path: expiry
  template: "{{ .expires_at }} {{ .lease_id }}"
`})
	if got := string(m["dsn"].Data); got != "postgres://esc_user@db.example:5432/shop" {
		t.Errorf("dsn %q", got)
	}
	env := string(m["env/pg.env"].Data)
	if !strings.Contains(env, `PASSWORD='S3CRET'\''PASS'`) || !strings.Contains(env, "USERNAME='esc_user'") || m["env/pg.env"].Mode != 0o400 {
		t.Errorf("env file %q mode %o", env, m["env/pg.env"].Mode)
	}
	var doc map[string]string
	if err := json.Unmarshal(m["creds.json"].Data, &doc); err != nil || doc["password"] != "S3CRET'PASS" || doc["host"] != "db.example" {
		t.Errorf("json %s %v", m["creds.json"].Data, err)
	}
	if string(m["user"].Data) != "esc_user" {
		t.Errorf("value file %q", m["user"].Data)
	}
	if string(m["expiry"].Data) != "2030-01-02T03:04:05Z shop-web-0-abcdefgh" {
		t.Errorf("expiry %q", m["expiry"].Data)
	}
}

func TestParseSpecRejects(t *testing.T) {
	for name, files := range map[string]string{
		"escaping path":  "- {path: ../x, value: password}",
		"absolute path":  "- {path: /etc/x, value: password}",
		"reserved path":  "- {path: ..data, value: password}",
		"two sources":    "- {path: x, value: password, format: env}",
		"no source":      "- {path: x}",
		"unknown format": "- {path: x, format: xml}",
		"bad mode":       "- {path: x, value: password, mode: '0999'}",
		"bad template":   "- {path: x, template: '{{ .x '}",
		"duplicate":      "- {path: x, value: password}\n- {path: x, value: username}",
		"file and dir":   "- {path: x, value: password}\n- {path: x/y, value: username}",
		"unknown field":  "- {path: x, value: password, owner: root}",
		"not a list":     "path: x",
		"empty list":     "[]",
	} {
		if _, err := ParseSpec(map[string]string{FilesParam: files}); !errors.Is(err, ErrInvalidSpec) {
			t.Errorf("%s: %v, want ErrInvalidSpec", name, err)
		}
	}
	if _, err := ParseSpec(map[string]string{FileModeParam: "rw"}); !errors.Is(err, ErrInvalidSpec) {
		t.Errorf("bad fileMode accepted")
	}
}

func TestRenderErrorsNeverQuoteValues(t *testing.T) {
	for _, files := range []string{
		"- {path: x, value: nope}",
		"- {path: x, template: '{{ .nope }}'}",
		"- {path: x, template: '{{ index .password 99 }}'}",
	} {
		s, err := ParseSpec(map[string]string{FilesParam: files})
		if err != nil {
			t.Fatal(err)
		}
		_, err = s.Render(lease)
		if err == nil {
			t.Fatalf("%s: rendered", files)
		}
		if strings.Contains(err.Error(), "S3CRET") {
			t.Fatalf("error quotes a secret: %v", err)
		}
	}
}

func TestTemplateOutputIsBounded(t *testing.T) {
	s, err := ParseSpec(map[string]string{FilesParam: `- {path: x, template: '{{range $i, $v := .}}{{printf "%0999999d" 0}}{{printf "%0999999d" 0}}{{printf "%0999999d" 0}}{{end}}'}`})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Render(lease); !errors.Is(err, storage.ErrTooLarge) || !strings.Contains(err.Error(), "exceed") {
		t.Fatalf("unbounded output: %v", err)
	}
}

// FuzzParseSpec: never panics; every accepted path is safe inside a volume.
func FuzzParseSpec(f *testing.F) {
	f.Add("- {path: a, value: password}\n- {path: b/c, format: env, mode: '0400'}")
	f.Add("- {path: ../../x, value: password}")
	f.Add("- {path: x, template: '{{ .password }}'}")
	f.Fuzz(func(t *testing.T, files string) {
		s, err := ParseSpec(map[string]string{FilesParam: files})
		if err != nil {
			return
		}
		for _, fs := range s.Files {
			if volumepath.Check(fs.Path) != nil {
				t.Fatalf("accepted path %q", fs.Path)
			}
		}
		if out, err := s.Render(lease); err == nil {
			for _, f := range out {
				if volumepath.Check(f.Path) != nil || f.Mode > 0o777 {
					t.Fatalf("rendered %q mode %o", f.Path, f.Mode)
				}
			}
		}
	})
}

func BenchmarkRender(b *testing.B) {
	s, err := ParseSpec(map[string]string{FilesParam: `
- {path: username, value: username}
- {path: password, value: password}
- {path: dsn, template: "postgres://{{ .username }}:{{ .password }}@{{ .host }}:{{ .port }}/{{ .database }}"}
`})
	if err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		if _, err := s.Render(lease); err != nil {
			b.Fatal(err)
		}
	}
}

// A provider's mode for a value (a GCP secret's mode) names the mode of
// its file, in the default layout and for a files entry of that value
// that sets none; the class's own mode wins; a write or execute bit from
// a provider is refused.
func TestProviderModes(t *testing.T) {
	l := lease
	l.Modes = map[string]os.FileMode{"password": 0o400}
	for _, c := range []struct {
		name   string
		params map[string]string
		want   map[string]os.FileMode
	}{
		{"default layout", nil, map[string]os.FileMode{"password": 0o400, "username": 0o440}},
		{"default layout, fileMode", map[string]string{FileModeParam: "0444"}, map[string]os.FileMode{"password": 0o400, "username": 0o444}},
		{"files", map[string]string{FilesParam: "- {path: p, value: password}\n- {path: q, value: password, mode: '0440'}\n- {path: t, template: '{{ .password }}'}"},
			map[string]os.FileMode{"p": 0o400, "q": 0o440, "t": 0o440}},
	} {
		s, err := ParseSpec(c.params)
		if err != nil {
			t.Fatal(err)
		}
		out, err := s.Render(l)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		for _, f := range out {
			if f.Mode != c.want[f.Path] {
				t.Errorf("%s: %s mode %#o, want %#o", c.name, f.Path, f.Mode, c.want[f.Path])
			}
		}
	}
	s, _ := ParseSpec(nil)
	for _, m := range []os.FileMode{0o600, 0o500, 0o4400, 0o441} {
		l.Modes = map[string]os.FileMode{"password": m}
		if _, err := s.Render(l); !errors.Is(err, ErrInvalidSpec) {
			t.Errorf("provider mode %#o: %v, want refused", m, err)
		}
	}
}
