package lease

import (
	"context"
	"errors"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ephemeral-secrets/csi-driver/pkg/spc"
	"github.com/ephemeral-secrets/csi-driver/pkg/storage"
)

// swapThenFail, once armed, writes the files and then reports a failure,
// as the store's WriteFiles does when a step after its swap fails (a
// top-level link, the removal of the old version).
type swapThenFail struct {
	Store
	armed atomic.Bool
}

func (s *swapThenFail) WriteFiles(id string, gid int, files []storage.File) error {
	if err := s.Store.WriteFiles(id, gid, files); err != nil {
		return err
	}
	if s.armed.CompareAndSwap(true, false) {
		return errors.New("injected: failed after the swap")
	}
	return nil
}

// A rotation whose file write failed after the swap is undone: the pod's
// files go back to the credential it keeps, never stay on the new one,
// which is revoked.
func TestRotationUndoneAfterASwappedWriteRestoresTheFiles(t *testing.T) {
	inTiers(t, time.Minute, testRotationUndoneAfterASwappedWriteRestoresTheFiles)
}

func testRotationUndoneAfterASwappedWriteRestoresTheFiles(t *testing.T, n *node) {
	ctx := context.Background()
	st := &swapThenFail{Store: n.store}
	m := n.manager(st, n.prov, Options{})
	defer m.Close()
	if err := m.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	v := n.volume("swap")
	v.Attributes[spc.ClassKey], v.Mount.Class = "db-tasks", "db-tasks"
	publish(t, m, v)
	before, err := n.files.readFile(filepath.Join(v.TargetPath, "username"))
	if err != nil {
		t.Fatal(err)
	}

	st.armed.Store(true)
	if _, err := m.RotateNow(ctx, v.ID); err == nil {
		t.Fatal("the rotation succeeded although its file write failed")
	}
	m.drain(ctx) // the new lease's revocation
	after, err := n.files.readFile(filepath.Join(v.TargetPath, "username"))
	if err != nil {
		t.Fatal(err)
	}
	if string(after) != string(before) {
		t.Errorf("the files name %s after the rotation was undone, want %s", after, before)
	}
	if err := n.login(ctx, v.TargetPath); err != nil {
		t.Errorf("the pod's files do not log in after the rotation was undone: %v", err)
	}
	unpublish(t, m, v)
	m.drain(ctx)
}
