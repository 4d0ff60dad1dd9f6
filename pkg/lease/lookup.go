package lease

import "github.com/ephemeral-secrets/csi-driver/pkg/provider"

// PodOf returns the pod a volume published on the node belongs to.
func (m *Manager) PodOf(volumeID string) (provider.Pod, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	v, ok := m.vols[volumeID]
	if !ok {
		return provider.Pod{}, false
	}
	return v.meta.Pod, true
}
