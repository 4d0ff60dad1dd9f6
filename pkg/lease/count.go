package lease

// Published reports whether the volume is published on the node: a
// publish of it is a republish.
func (m *Manager) Published(volumeID string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	_, ok := m.vols[volumeID]
	return ok
}

// Live counts the live credentials of namespace, and of the whole node:
// one per published volume not withdrawn, and one per task lease.
func (m *Manager) Live(namespace string) (inNamespace, onNode int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, v := range m.vols {
		if v.meta.State == StateWithdrawn {
			continue // holds no credential any more
		}
		n := 1 + len(v.meta.Tasks)
		onNode += n
		if v.meta.Pod.Namespace == namespace {
			inNamespace += n
		}
	}
	return inNamespace, onNode
}
