package lease

import (
	"context"
	"time"
)

// setExpiry moves the expiry of a published volume's lease as the manager
// knows it, under the volume's lock, as only its holder may.
func (m *Manager) setExpiry(volumeID string, move func(time.Time) time.Time) {
	h, err := m.vols.Lock(context.Background(), volumeID)
	if err != nil {
		panic(err)
	}
	defer h.Unlock()
	v := h.Volume()
	l := v.Lease()
	l.ExpiresAt = move(l.ExpiresAt)
	v.Install(h, v.Meta(), l, v.Granted())
}
