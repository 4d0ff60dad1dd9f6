package e2e

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/kubelet"
)

// thiefAddr is the address a stolen credential is used from: a second
// loopback address, which the suite's server lets log in, and which the
// backend file below does not expect (it lists 127.0.0.1 only).
const thiefAddr = "127.0.0.2"

// useClasses are a class per onForeignUse.
var useClasses = func() string {
	var b strings.Builder
	for _, action := range []string{"alert", "revoke", "record"} {
		fmt.Fprintf(&b, `---
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: use-%[1]s
  namespace: team-a
spec:
  provider: postgres
  parameters:
    connection: main
    role: %[1]s
    files: |
      - path: username
        value: username
      - path: password
        value: password
`, action)
	}
	return b.String()
}()

// useBackends is the suite's server with the pods' own address expected
// (loopback 127.0.0.1, as the demo lists), and a role per onForeignUse.
func useBackends() string {
	var b strings.Builder
	fmt.Fprintf(&b, `postgres:
  connections:
    main:
      url: %s
      expectedSources: [127.0.0.1/32]
      roles:
`, pg.AdminURL())
	for _, action := range []string{"alert", "revoke", "record"} {
		fmt.Fprintf(&b, `        %s:
          onForeignUse: %s
          creationStatements:
            - CREATE ROLE "{{.Name}}" LOGIN PASSWORD '{{.Password}}' VALID UNTIL '{{.Expiration}}'
          allowed:
            - namespace: team-a
              serviceAccount: app
`, action, action)
	}
	return b.String()
}

func useVolume(action string) kubelet.Volume {
	return dbVolume("use-" + action)
}

// loginFrom connects as user from the local address from.
func loginFrom(ctx context.Context, user, password, from string) (*pgx.Conn, error) {
	cfg, err := pgx.ParseConfig(pg.URL(user, password))
	if err != nil {
		return nil, err
	}
	cfg.DialFunc = (&net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}, Timeout: 5 * time.Second}).DialContext
	return pgx.ConnectConfig(ctx, cfg)
}

// useEvents are the use records of pod's credentials, as "event" or
// "event:action", with their details.
func useEvents(t *testing.T, f *fixture, pod string) (events []string, details []string) {
	t.Helper()
	for _, r := range auditOf(t, f) {
		u, _ := r["use"].(map[string]any)
		p, _ := r["pod"].(map[string]any)
		if r["stage"] != "use" || u == nil || p["name"] != pod {
			continue
		}
		e := fmt.Sprint(u["event"])
		if a, ok := u["action"].(string); ok {
			e += ":" + a
		}
		events = append(events, e)
		details = append(details, fmt.Sprint(r["detail"]))
	}
	return events, details
}

func has(events []string, e string) bool {
	for _, x := range events {
		if x == e {
			return true
		}
	}
	return false
}

// A pod that uses its credential from its own address has use records: its
// first use, and at its revocation a summary that says it was used; a
// credential never used is revoked with a "never used" summary.
func TestUseIsAudited(t *testing.T) {
	ctx := context.Background()
	f := startFixture(t, useClasses, useBackends())
	pod := newPod("user-1", "app")
	target, err := f.kube.Publish(ctx, pod, useVolume("alert"))
	if err != nil {
		t.Fatal(err)
	}
	user, password := readFile(t, target, "username"), readSecret(t, target, "password")
	idle := newPod("idle-1", "app")
	idleTarget, err := f.kube.Publish(ctx, idle, useVolume("alert"))
	if err != nil {
		t.Fatal(err)
	}
	if readFile(t, idleTarget, "username") == "" {
		t.Fatal("no username")
	}

	conn, err := loginFrom(ctx, user, password, "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	harness.Eventually(t, 10*time.Second, "the first use is audited", func() (bool, error) {
		ev, _ := useEvents(t, f, pod.Name)
		return has(ev, "first"), nil
	})
	conn.Close(ctx)
	for _, p := range []kubelet.Pod{pod, idle} {
		if err := f.kube.Unpublish(ctx, p, "db"); err != nil {
			t.Fatal(err)
		}
	}
	harness.Eventually(t, 15*time.Second, "both summaries are audited", func() (bool, error) {
		a, _ := useEvents(t, f, pod.Name)
		b, _ := useEvents(t, f, idle.Name)
		return has(a, "summary") && has(b, "summary"), nil
	})
	ev, details := useEvents(t, f, pod.Name)
	if strings.Join(ev, " ") != "first summary" || !strings.HasPrefix(details[1], "revoked; used: 1 sessions seen") ||
		!strings.Contains(details[0], "127.0.0.1 (expected)") {
		t.Errorf("use records of a used credential: %v %q", ev, details)
	}
	ev, details = useEvents(t, f, idle.Name)
	if strings.Join(ev, " ") != "summary" || details[0] != "revoked; never used" {
		t.Errorf("use records of an idle credential: %v %q", ev, details)
	}
	// Each use record names the volume, as its issue record does (the
	// role's tag carries it).
	vols := map[string]map[string]bool{}
	for _, r := range auditOf(t, f) {
		p, _ := r["pod"].(map[string]any)
		if r["stage"] == "issue" || r["stage"] == "use" {
			k := fmt.Sprint(p["name"], " ", r["stage"])
			if vols[k] == nil {
				vols[k] = map[string]bool{}
			}
			vols[k][fmt.Sprint(r["volume_id"])] = true
		}
	}
	for _, p := range []kubelet.Pod{pod, idle} {
		issued, used := vols[p.Name+" issue"], vols[p.Name+" use"]
		if len(issued) != 1 || len(used) != 1 || fmt.Sprint(issued) != fmt.Sprint(used) {
			t.Errorf("%s: volume of the issue records %v, of the use records %v: want the same one", p.Name, issued, used)
		}
	}
}

// A login from an address none expected is a foreign use, acted on as
// the role says: alert and record leave the sessions be; revoke ends every
// session of the role, drops it and withdraws the pod's files, within an
// interval and the kill.
func TestForeignUseInProcess(t *testing.T) {
	ctx := context.Background()
	f := startFixture(t, useClasses, useBackends())
	for _, action := range []string{"alert", "record", "revoke"} {
		t.Run(action, func(t *testing.T) {
			pod := newPod("victim-"+action, "app")
			target, err := f.kube.Publish(ctx, pod, useVolume(action))
			if err != nil {
				t.Fatal(err)
			}
			user, password := readFile(t, target, "username"), readSecret(t, target, "password")
			own, err := loginFrom(ctx, user, password, "127.0.0.1")
			if err != nil {
				t.Fatal(err)
			}
			defer own.Close(ctx)
			stolen, err := loginFrom(ctx, user, password, thiefAddr)
			if err != nil {
				t.Fatal(err)
			}
			defer stolen.Close(ctx)
			stolenAt := time.Now()
			harness.Eventually(t, 10*time.Second, "the foreign use is audited", func() (bool, error) {
				ev, _ := useEvents(t, f, pod.Name)
				return has(ev, "foreign:"+action), nil
			})
			if action != "revoke" {
				if _, err := stolen.Exec(ctx, `SELECT 1`); err != nil {
					t.Errorf("%s ended the foreign session: %v", action, err)
				}
				if _, err := os.Stat(filepath.Join(target, "password")); err != nil {
					t.Errorf("%s withdrew the files: %v", action, err)
				}
				return
			}
			harness.Eventually(t, 10*time.Second, "the foreign session is ended", func() (bool, error) {
				_, err := stolen.Exec(ctx, `SELECT 1`)
				return err != nil, nil
			})
			t.Logf("from the thief's login to its session's end: %s (at most one --use-interval, 1s, and the kill)",
				time.Since(stolenAt).Round(10*time.Millisecond))
			harness.Eventually(t, 10*time.Second, "the role is dropped", roleGone(ctx, user))
			harness.Eventually(t, 10*time.Second, "the pod's files are withdrawn", func() (bool, error) {
				_, err := os.Stat(filepath.Join(target, "password"))
				return os.IsNotExist(err), nil
			})
			if _, err := own.Exec(ctx, `SELECT 1`); err == nil {
				t.Error("the pod's own session outlives the kill")
			}
			if ev, details := useEvents(t, f, pod.Name); !has(ev, "kill:revoke") {
				t.Errorf("no kill record: %v %q", ev, details)
			}
			_, body, err := f.driver.Scrape("/metrics")
			if err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(body, `ephemeral_secrets_use_foreign_total{action="revoke",connection="main",role="revoke"} 1`) {
				t.Errorf("metrics lack the foreign use")
			}
			if strings.Contains(body, password) {
				t.Error("the metrics hold the password")
			}
		})
	}
}
