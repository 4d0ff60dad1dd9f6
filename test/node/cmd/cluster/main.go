// Command cluster starts and stops the single-node cluster of package
// node for a person ("make cluster", "make cluster-down"): the node, a
// PostgreSQL with the example's database, and the driver installed from
// the chart. The API server is forwarded to 127.0.0.1 on the host, so
// kubectl works from the person's shell.
//
//	cluster up   [--dir bin/cluster] [--port 16443]
//	cluster down [--dir bin/cluster]
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/ephemeral-secrets/csi-driver/test/image"
	"github.com/ephemeral-secrets/csi-driver/test/kube"
	"github.com/ephemeral-secrets/csi-driver/test/node"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: cluster up|down [--dir DIR] [--port PORT]")
		os.Exit(2)
	}
	fs := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	dir := fs.String("dir", "bin/cluster", "the cluster's directory (state, logs, kubeconfig)")
	port := fs.Int("port", 16443, "host port on 127.0.0.1 forwarded to the API server")
	_ = fs.Parse(os.Args[2:])
	abs, err := filepath.Abs(*dir)
	if err != nil {
		fail(err)
	}
	switch os.Args[1] {
	case "up":
		err = up(abs, *port)
	case "down":
		err = down(abs)
	case "serve": // inside the namespaces, started by up
		err = serve(abs)
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fail(err)
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "cluster:", err)
	os.Exit(1)
}

func pidFile(dir string) string { return filepath.Join(dir, "cluster.pid") }

// up starts the node's supervisor in new namespaces, detached, hands it a
// listener on the host's loopback and waits for its word.
func up(dir string, port int) error {
	if pid, err := readPid(dir); err == nil && alive(pid) {
		return fmt.Errorf("a cluster is running already (pid %d); make cluster-down first", pid)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		return fmt.Errorf("host port: %w", err)
	}
	lf, err := l.(*net.TCPListener).File()
	if err != nil {
		return err
	}
	r, w, err := os.Pipe()
	if err != nil {
		return err
	}
	cmd, err := node.Command([]string{"serve", "--dir", dir}, lf, w)
	if err != nil {
		return err
	}
	log, err := os.Create(filepath.Join(dir, "cluster.log"))
	if err != nil {
		return err
	}
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr.Setsid = true
	if err := cmd.Start(); err != nil {
		return err
	}
	_ = os.WriteFile(pidFile(dir), []byte(strconv.Itoa(cmd.Process.Pid)), 0o644)
	w.Close()
	lf.Close()
	l.Close()
	fmt.Printf("starting the cluster (log: %s) ...\n", log.Name())
	line, err := bufio.NewReader(r).ReadString('\n')
	if !strings.HasPrefix(line, "ok") {
		tail, _ := os.ReadFile(log.Name())
		if len(tail) > 4000 {
			tail = tail[len(tail)-4000:]
		}
		_ = down(dir)
		return fmt.Errorf("the cluster did not start: %s%v\n%s", line, err, tail)
	}
	_ = cmd.Process.Release()
	tools := filepath.Dir(mustTool("kube-apiserver"))
	fmt.Printf(`The cluster is up: one node (%s), the driver installed in namespace %s, PostgreSQL
with the example's database at %s:%s. To use it:

  export KUBECONFIG=%s PATH=%s:$PATH
  kubectl get pods -A

Stop it with: make cluster-down
`, node.Name, node.Namespace, node.NodeIP, strings.TrimSpace(strings.TrimPrefix(line, "ok")), filepath.Join(dir, "kubeconfig"), tools)
	return nil
}

func mustTool(name string) string {
	p, err := kube.Tool(name)
	if err != nil {
		fail(err)
	}
	return p
}

// serve runs inside the namespaces: it starts everything, forwards the
// host's listener (fd 3) to the API server, says "ok" on fd 4, and stops
// everything at SIGTERM.
func serve(dir string) error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	ready := os.NewFile(4, "ready")
	say := func(s string) { _, _ = io.WriteString(ready, s+"\n") }
	l, err := net.FileListener(os.NewFile(3, "listener"))
	if err != nil {
		say("error " + err.Error())
		return err
	}
	logf := func(format string, args ...any) { fmt.Printf(time.Now().Format("15:04:05 ")+format+"\n", args...) }
	repoRoot, err := os.Getwd()
	if err != nil {
		return err
	}
	work := filepath.Join(dir, "node")
	_ = os.RemoveAll(work)
	if err := os.MkdirAll(filepath.Join(work, "images"), 0o755); err != nil {
		return err
	}
	logf("building images")
	images, err := node.Images(ctx, repoRoot, filepath.Join(work, "images"))
	if err != nil {
		say("error " + err.Error())
		return err
	}
	n, err := node.Start(ctx, node.Options{Work: work, Images: images, PauseImage: image.PauseImage, Logf: logf})
	if err != nil {
		say("error " + err.Error())
		return err
	}
	defer n.Stop()
	db, err := node.StartDatabase(ctx)
	if err != nil {
		say("error " + err.Error())
		return err
	}
	defer db.Close()
	example, err := os.ReadFile(filepath.Join(repoRoot, "examples/postgres/admin/backends.yaml"))
	if err != nil {
		say("error " + err.Error())
		return err
	}
	backends, err := db.Backends(example)
	if err == nil {
		logf("installing the driver with helm")
		err = n.InstallDriver(ctx, repoRoot, backends)
	}
	if err != nil {
		logf("%s", n.Describe(ctx))
		say("error " + err.Error())
		return err
	}
	u, err := url.Parse(n.URL)
	if err != nil {
		return err
	}
	if err := n.Cluster.Kubeconfig(filepath.Join(dir, "kubeconfig"), "https://"+l.Addr().String(), kube.AdminToken); err != nil {
		return err
	}
	go forward(l, u.Host)
	say("ok " + strconv.Itoa(db.Port))
	ready.Close()
	logf("cluster up")
	<-ctx.Done()
	logf("stopping: deleting the pods that use the driver first, so their credentials are revoked")
	n.DeleteWorkloads(context.Background(), 2*time.Minute)
	return nil
}

// forward copies connections from l to addr (inside the namespaces).
func forward(l net.Listener, addr string) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			u, err := net.Dial("tcp", addr)
			if err != nil {
				return
			}
			defer u.Close()
			go func() { _, _ = io.Copy(u, c); u.(*net.TCPConn).CloseWrite() }()
			_, _ = io.Copy(c, u)
		}()
	}
}

// down stops the supervisor and waits for it (it removes everything).
func down(dir string) error {
	pid, err := readPid(dir)
	if errors.Is(err, os.ErrNotExist) {
		fmt.Println("no cluster running")
		return nil
	}
	if err != nil {
		return err
	}
	if alive(pid) {
		_ = syscall.Kill(pid, syscall.SIGTERM)
		deadline := time.Now().Add(4 * time.Minute)
		for alive(pid) && time.Now().Before(deadline) {
			time.Sleep(200 * time.Millisecond)
		}
		if alive(pid) {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	_ = os.Remove(pidFile(dir))
	left := node.Leftovers(pid)
	if len(left) > 0 {
		return fmt.Errorf("left on the host: %s", strings.Join(left, "; "))
	}
	fmt.Println("cluster stopped; nothing left on the host")
	return nil
}

func readPid(dir string) (int, error) {
	b, err := os.ReadFile(pidFile(dir))
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(strings.TrimSpace(string(b)))
}

func alive(pid int) bool {
	if syscall.Kill(pid, 0) != nil {
		return false
	}
	st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	return err == nil && !strings.Contains(string(st), ") Z ")
}
