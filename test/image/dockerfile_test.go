package image

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"testing"
)

// instruction is one line of a Dockerfile, continuations joined.
type instruction struct{ cmd, args string }

// finalStage reads the instructions of a Dockerfile's last stage.
func finalStage(t *testing.T, path string) []instruction {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var out []instruction
	var cur string
	for _, line := range strings.Split(string(b), "\n") {
		trimmed := strings.TrimSpace(line)
		if strings.HasPrefix(trimmed, "#") && cur == "" {
			continue
		}
		if strings.HasSuffix(trimmed, `\`) {
			cur += strings.TrimSuffix(trimmed, `\`) + " "
			continue
		}
		cur += trimmed
		if cmd, args, _ := strings.Cut(cur, " "); cmd != "" {
			if strings.EqualFold(cmd, "FROM") {
				out = nil
			}
			out = append(out, instruction{strings.ToUpper(cmd), strings.TrimSpace(args)})
		}
		cur = ""
	}
	return out
}

// pairs splits ENV or LABEL arguments, key=value separated by spaces.
func pairs(args string) []string { return strings.Fields(args) }

// TestDockerfileDescribesTheSameImage: the Dockerfile (for people with
// Docker) and DriverSpec (make image) give the image the same files,
// entrypoint, cmd, user, environment and labels.
func TestDockerfileDescribesTheSameImage(t *testing.T) {
	spec, err := DriverSpec(context.Background(), "../..", "", "esc.local/csi-driver:test", "${VERSION}")
	if err != nil {
		t.Fatal(err)
	}
	var files, env, labels []string
	var user string
	var entrypoint, cmd []string
	stage := finalStage(t, "../../Dockerfile")
	if len(stage) == 0 || stage[0].args != "scratch" {
		t.Fatalf("the final stage is not FROM scratch: %v", stage)
	}
	for _, in := range stage {
		switch in.cmd {
		case "COPY":
			f := strings.Fields(in.args)
			src, dst := f[len(f)-2], f[len(f)-1]
			if strings.HasPrefix(f[0], "--from=") {
				files = append(files, dst)
				continue
			}
			err := filepath.Walk(filepath.Join("../..", src), func(p string, info os.FileInfo, err error) error {
				if err == nil && info.Mode().IsRegular() {
					rel, _ := filepath.Rel(filepath.Join("../..", src), p)
					files = append(files, filepath.Join(dst, rel))
				}
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
		case "ENV":
			env = append(env, pairs(in.args)...)
		case "LABEL":
			labels = append(labels, pairs(in.args)...)
		case "USER":
			user = in.args
		case "ENTRYPOINT":
			if err := json.Unmarshal([]byte(in.args), &entrypoint); err != nil {
				t.Errorf("ENTRYPOINT %s: %v", in.args, err)
			}
		case "CMD":
			if err := json.Unmarshal([]byte(in.args), &cmd); err != nil {
				t.Errorf("CMD %s: %v", in.args, err)
			}
		}
	}
	var specFiles []string
	for _, f := range spec.Files {
		specFiles = append(specFiles, f.Path)
	}
	var specLabels []string
	for k, v := range spec.Labels {
		if k == "org.opencontainers.image.revision" {
			v = "${REVISION}"
		}
		specLabels = append(specLabels, k+"="+v)
	}
	sort.Strings(files)
	sort.Strings(specFiles)
	sort.Strings(labels)
	sort.Strings(specLabels)
	for _, c := range []struct {
		what         string
		docker, spec any
	}{
		{"files", files, specFiles},
		{"ENV", env, spec.Env},
		{"LABEL", labels, specLabels},
		{"USER", user, spec.User},
		{"ENTRYPOINT", entrypoint, spec.Entrypoint},
		{"CMD", cmd, spec.Cmd},
	} {
		if !reflect.DeepEqual(c.docker, c.spec) {
			t.Errorf("%s: the Dockerfile has %q, make image %q", c.what, c.docker, c.spec)
		}
	}

	// The binary is built the way BuildGo builds it.
	b, _ := os.ReadFile("../../Dockerfile")
	for _, want := range []string{"CGO_ENABLED=0 go build -trimpath -buildvcs=false -tags " + BuildTags, `-ldflags "-s -w -buildid= -X main.version=${VERSION}"`} {
		if !strings.Contains(string(b), want) {
			t.Errorf("the Dockerfile does not build with %s", want)
		}
	}
}
