package session

import (
	"runtime"
	"testing"
	"weak"
)

func hooks(s *Session) int {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return len(s.onClose)
}

// TestGroupHooksDoNotAccumulate: a long-lived session that joins and leaves
// groups (rooms, matches) must not collect one close hook per join, each
// keeping its group reachable until the session ends.
func TestGroupHooksDoNotAccumulate(t *testing.T) {
	s := New(1, nil, nil)
	g := NewGroup("lobby", nil)
	for range 1000 {
		if err := g.Add(s); err != nil {
			t.Fatal(err)
		}
		if err := g.Leave(s); err != nil {
			t.Fatal(err)
		}
	}
	if n := hooks(s); n > 1 {
		t.Errorf("after 1000 Add/Leave of one group: %d close hooks", n)
	}

	var last weak.Pointer[Group]
	for range 1000 {
		m := NewGroup("match", nil)
		if err := m.Add(s); err != nil {
			t.Fatal(err)
		}
		last = weak.Make(m)
		m.Close()
	}
	if n := hooks(s); n > 1 {
		t.Errorf("after 1000 closed matches: %d close hooks", n)
	}
	runtime.GC()
	if last.Value() != nil {
		t.Errorf("a closed group the session left is still reachable from the session")
	}

	// The hooks that remain still do their job.
	if err := g.Add(s); err != nil {
		t.Fatal(err)
	}
	s.Release()
	if g.Contains(1) {
		t.Fatal("not removed on Release")
	}
}
