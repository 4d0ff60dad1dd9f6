package lease

import "github.com/ephemeral-secrets/csi-driver/pkg/storage"

// Published reports whether the volume is published on the node: a
// publish of it is a republish.
func (m *Manager) Published(volumeID string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	_, ok := m.vols[volumeID]
	return ok
}

// Live counts the published volumes (each holds one live credential) of
// namespace, and of the whole node.
func (m *Manager) Live(namespace string) (inNamespace, onNode int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, v := range m.vols {
		if v.meta.State == storage.StateWithdrawn {
			continue // holds no credential any more
		}
		onNode++
		if v.meta.Pod.Namespace == namespace {
			inNamespace++
		}
	}
	return inNamespace, onNode
}
