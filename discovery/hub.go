package discovery

import (
	"context"
	"sync"
	"sync/atomic"
)

// change is one update of a member: a put when m is non-nil, else a delete.
type change struct {
	id  string
	m   *Member
	mod int64
}

// hub holds the current Table and the subscribers; both implementations
// feed it. Updates are serialized by mu; readers load the table atomically.
type hub struct {
	table atomic.Pointer[Table]

	mu      sync.Mutex
	subs    map[*subscriber]struct{}
	changed chan struct{} // closed and replaced on every table update
	closed  bool
}

func newHub() *hub {
	h := &hub{subs: map[*subscriber]struct{}{}, changed: make(chan struct{})}
	h.table.Store(newTable(0, map[string]*Member{}, map[string]int64{}))
	return h
}

// reset replaces the table with a full snapshot and emits the difference
// with the previous table: deletes first, then puts, each sorted by id.
func (h *hub) reset(rev int64, members map[string]*Member, mods map[string]int64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	old := h.table.Load()
	var evs []Event
	for _, id := range old.sortedIDs() {
		if members[id] == nil {
			evs = append(evs, Event{Type: EventDelete, Member: old.Members[id]})
		}
	}
	t := newTable(rev, members, mods)
	for _, id := range t.sortedIDs() {
		if old.Members[id] == nil || old.mods[id] != mods[id] {
			evs = append(evs, Event{Type: EventPut, Member: members[id]})
		}
	}
	h.publish(t, evs)
}

// apply applies incremental changes observed at revision rev.
func (h *hub) apply(rev int64, changes []change) {
	h.mu.Lock()
	defer h.mu.Unlock()
	old := h.table.Load()
	members := make(map[string]*Member, len(old.Members)+1)
	mods := make(map[string]int64, len(old.Members)+1)
	for id, m := range old.Members {
		members[id], mods[id] = m, old.mods[id]
	}
	var evs []Event
	for _, c := range changes {
		prev := members[c.id]
		switch {
		case c.m != nil:
			if prev != nil && mods[c.id] >= c.mod {
				continue // already seen
			}
			members[c.id], mods[c.id] = c.m, c.mod
			evs = append(evs, Event{Type: EventPut, Member: c.m})
		case prev != nil:
			delete(members, c.id)
			delete(mods, c.id)
			evs = append(evs, Event{Type: EventDelete, Member: prev})
		}
	}
	if rev < old.Rev {
		rev = old.Rev
	}
	h.publish(newTable(rev, members, mods), evs)
}

// publish stores t and queues evs to every subscriber. h.mu must be held.
func (h *hub) publish(t *Table, evs []Event) {
	h.table.Store(t)
	close(h.changed)
	h.changed = make(chan struct{})
	if len(evs) == 0 {
		return
	}
	for s := range h.subs {
		s.push(evs)
	}
}

// waitRev waits until the table revision reaches rev.
func (h *hub) waitRev(ctx context.Context, rev int64) error {
	for {
		h.mu.Lock()
		t, ch := h.table.Load(), h.changed
		h.mu.Unlock()
		if t.Rev >= rev {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func (h *hub) subscribe(fn func(Event)) (cancel func()) {
	s := &subscriber{fn: fn, wake: make(chan struct{}, 1), done: make(chan struct{})}
	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		return func() {}
	}
	t := h.table.Load()
	var evs []Event
	for _, id := range t.sortedIDs() {
		evs = append(evs, Event{Type: EventPut, Member: t.Members[id]})
	}
	s.push(evs)
	h.subs[s] = struct{}{}
	h.mu.Unlock()
	go s.run()
	return func() {
		h.mu.Lock()
		delete(h.subs, s)
		h.mu.Unlock()
		s.stop()
	}
}

// close cancels every subscription; later subscriptions get no events.
func (h *hub) close() {
	h.mu.Lock()
	subs := h.subs
	h.subs = map[*subscriber]struct{}{}
	h.closed = true
	h.mu.Unlock()
	for s := range subs {
		s.stop()
	}
}

// subscriber delivers queued events to fn on its own goroutine.
type subscriber struct {
	fn      func(Event)
	mu      sync.Mutex
	queue   []Event
	wake    chan struct{}
	done    chan struct{}
	once    sync.Once
	stopped atomic.Bool
}

func (s *subscriber) push(evs []Event) {
	if len(evs) == 0 {
		return
	}
	s.mu.Lock()
	s.queue = append(s.queue, evs...)
	s.mu.Unlock()
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

func (s *subscriber) stop() {
	s.once.Do(func() {
		s.stopped.Store(true)
		close(s.done)
	})
}

func (s *subscriber) run() {
	for {
		select {
		case <-s.done:
			return
		case <-s.wake:
		}
		for {
			s.mu.Lock()
			batch := s.queue
			s.queue = nil
			s.mu.Unlock()
			if len(batch) == 0 {
				break
			}
			for _, ev := range batch {
				if s.stopped.Load() {
					return
				}
				s.fn(ev)
			}
		}
	}
}
