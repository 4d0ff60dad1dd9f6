package lease

import "github.com/ephemeral-secrets/csi-driver/pkg/provider"

// Published reports whether the volume is published on the node: a
// publish of it is a republish.
func (m *Manager) Published(volumeID string) bool { return m.vols.Get(volumeID) != nil }

// PodOf returns the pod a volume published on the node belongs to.
func (m *Manager) PodOf(volumeID string) (provider.Pod, bool) {
	if v := m.vols.Get(volumeID); v != nil {
		return v.Meta().Pod, true
	}
	return provider.Pod{}, false
}

// Live counts the live credentials of namespace, and of the whole node:
// one per published volume not withdrawn, and one per task lease.
func (m *Manager) Live(namespace string) (inNamespace, onNode int) {
	for _, v := range m.vols.All() {
		meta := v.Meta()
		if meta.State == StateWithdrawn {
			continue // holds no credential any more
		}
		n := 1 + len(meta.Tasks)
		onNode += n
		if meta.Pod.Namespace == namespace {
			inNamespace += n
		}
	}
	return inNamespace, onNode
}
