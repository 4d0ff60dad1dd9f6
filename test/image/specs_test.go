package image

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/mutate"

	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/pgtest"
)

// imageFiles is the image's file tree: path -> mode and content.
func imageFiles(t *testing.T, s Spec) map[string]string {
	t.Helper()
	p, err := parsePlatform(s.Platform)
	if err != nil {
		t.Fatal(err)
	}
	img, err := build(s, p, time.Unix(0, 0))
	if err != nil {
		t.Fatal(err)
	}
	rc := mutate.Extract(img)
	defer rc.Close()
	files := map[string]string{}
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return files
		}
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(tr)
		files["/"+h.Name] = fmt.Sprintf("%v %s", os.FileMode(h.Mode), b)
	}
}

func TestDriverSpec(t *testing.T) {
	s, err := DriverSpec(context.Background(), "../..", "", "esc.local/csi-driver:test", "v9.9.9")
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(s.Entrypoint, []string{"/ephemeral-secrets-csi"}) || !reflect.DeepEqual(s.Cmd, []string{"serve"}) || s.User != "" {
		t.Errorf("entrypoint %q cmd %q user %q", s.Entrypoint, s.Cmd, s.User)
	}
	for _, l := range []string{"source", "version", "revision", "licenses"} {
		if s.Labels["org.opencontainers.image."+l] == "" {
			t.Errorf("no %s label: %v", l, s.Labels)
		}
	}
	files := imageFiles(t, s)
	ca, err := os.ReadFile(CABundle)
	if err != nil {
		t.Fatal(err)
	}
	if files[CABundle] != "-rw-r--r-- "+string(ca) {
		t.Errorf("%s is not the build machine's CA bundle", CABundle)
	}
	if !strings.HasPrefix(files["/etc/passwd"], "-rw-r--r-- root:x:0:0:") || !strings.Contains(files["/etc/passwd"], "\nnonroot:x:65532:65532:") {
		t.Errorf("/etc/passwd: %q", files["/etc/passwd"])
	}
	for _, bin := range []string{"/ephemeral-secrets-csi", "/ephemeral-secrets-csi-aws", "/ephemeral-secrets-csi-all"} {
		if !strings.HasPrefix(files[bin], "-rwxr-xr-x \x7fELF") {
			t.Errorf("%s is not an executable", bin)
		}
	}
}

// TestProjectImagesRun imports the driver, db-check and pause images into
// a real containerd and runs each with runc.
func TestProjectImagesRun(t *testing.T) {
	ctx := context.Background()
	c := startContainerd(t)
	dir := t.TempDir()
	load := func(t *testing.T, s Spec) {
		t.Helper()
		archive := filepath.Join(dir, "image.tar")
		if err := Write(archive, s); err != nil {
			t.Fatal(err)
		}
		if _, err := c.ctr(ctx, "images", "import", archive); err != nil {
			t.Fatal(err)
		}
	}

	t.Run("driver", func(t *testing.T) {
		s, err := DriverSpec(ctx, "../..", "", "esc.local/csi-driver:test", "v9.9.9-test")
		if err != nil {
			t.Fatal(err)
		}
		load(t, s)
		for i, bin := range []string{"/ephemeral-secrets-csi", "/ephemeral-secrets-csi-aws", "/ephemeral-secrets-csi-all"} {
			out, err := c.ctr(ctx, "run", "--rm", s.Name, fmt.Sprintf("driver-version-%d", i), bin, "version")
			if err != nil || strings.TrimSpace(out) != "v9.9.9-test" {
				t.Errorf("%s says %q, %v", bin, out, err)
			}
		}
	})

	t.Run("db-check", func(t *testing.T) {
		pg, err := pgtest.Start()
		if err != nil {
			t.Fatal(err)
		}
		defer pg.Close()
		err = pg.Exec(ctx, `CREATE TABLE orders (id int)`, `CREATE TABLE customers (id int)`,
			`CREATE ROLE reader LOGIN PASSWORD 'reader-pw'`, `GRANT SELECT ON orders TO reader`)
		if err != nil {
			t.Fatal(err)
		}
		s, err := DBCheckSpec(ctx, "../..", "", "esc.local/db-check:test")
		if err != nil {
			t.Fatal(err)
		}
		load(t, s)
		secrets := filepath.Join(dir, "db")
		if err := os.Mkdir(secrets, 0o755); err != nil {
			t.Fatal(err)
		}
		env := filepath.Join(secrets, "pg.env")
		content := fmt.Sprintf("PGHOST=127.0.0.1\nPGPORT=%d\nPGDATABASE=postgres\nPGUSER=reader\nPGPASSWORD=reader-pw\n", pg.Port)
		if err := os.WriteFile(env, []byte(content), 0o400); err != nil {
			t.Fatal(err)
		}
		run := func(id string) (string, error) {
			return c.ctr(ctx, "run", "--rm", "--net-host",
				"--mount", "type=bind,src="+secrets+",dst=/run/secrets/db,options=rbind:ro", s.Name, id,
				"/db-check", "--env-file", "/run/secrets/db/pg.env",
				"--allowed", "SELECT count(*) FROM orders", "--forbidden", "SELECT count(*) FROM customers")
		}
		// 0400 root: a non-root user cannot read it.
		out, err := run("db-check-root-file")
		if err == nil || !strings.Contains(out, "permission denied") || !strings.Contains(err.Error(), "exit status 2") {
			t.Errorf("db-check read a root-only file (is it root?): %v\n%s", err, out)
		}
		// 0440 root:65532, as the driver gives a pod with fsGroup 65532.
		if err := os.Chown(env, 0, 65532); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(env, 0o440); err != nil {
			t.Fatal(err)
		}
		out, err = run("db-check")
		if err != nil || !strings.Contains(out, "login ok: user=reader") || !strings.Contains(out, "SQLSTATE 42501") {
			t.Errorf("db-check: %v\n%s", err, out)
		}
		if strings.Contains(out, "reader-pw") {
			t.Errorf("db-check printed the password:\n%s", out)
		}
	})

	t.Run("pause", func(t *testing.T) {
		s, err := PauseSpec(ctx, "../..", "")
		if err != nil {
			t.Fatal(err)
		}
		if s.Name != PauseImage {
			t.Errorf("pause image named %s", s.Name)
		}
		load(t, s)
		var out bytes.Buffer
		run := exec.Command("ctr", "--address", c.address, "-n", "k8s.io", "run", "--rm", PauseImage, "pause-test")
		run.Stdout, run.Stderr = &out, &out
		if err := run.Start(); err != nil {
			t.Fatal(err)
		}
		harness.Eventually(t, time.Minute, "pause runs", func() (bool, error) {
			ls, err := c.ctr(ctx, "tasks", "ls")
			return strings.Contains(ls, "RUNNING"), err
		})
		if _, err := c.ctr(ctx, "tasks", "kill", "--signal", "SIGTERM", "pause-test"); err != nil {
			t.Fatal(err)
		}
		exited := make(chan error, 1)
		go func() { exited <- run.Wait() }()
		select {
		case err := <-exited:
			if err != nil {
				t.Errorf("pause after SIGTERM: %v\n%s", err, out.String())
			}
		case <-time.After(time.Minute):
			_, _ = c.ctr(ctx, "tasks", "kill", "--signal", "SIGKILL", "pause-test")
			<-exited
			t.Errorf("pause ignored SIGTERM")
		}
	})
}
