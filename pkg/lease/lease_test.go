package lease

import "testing"

func TestParseGID(t *testing.T) {
	for in, want := range map[string]int{"": -1, "0": 0, "2000": 2000} {
		if got, err := ParseGID(in); err != nil || got != want {
			t.Errorf("ParseGID(%q) = %d, %v", in, got, err)
		}
	}
	for _, in := range []string{"wheel", "-1", "99999999999", "1.5"} {
		if _, err := ParseGID(in); err == nil {
			t.Errorf("ParseGID(%q) accepted", in)
		}
	}
}
