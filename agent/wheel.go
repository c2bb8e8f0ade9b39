package agent

import (
	"sync"
	"time"
)

// wheel is the one timing mechanism for every connection: a single goroutine
// that ticks and visits connections. Handshaking connections sit on a pending
// list visited every tick (handshake timeout). Working connections are spread
// over heartbeat/tick slots; one slot is visited per tick, so each connection
// is visited once per heartbeat interval: it gets a heartbeat packet, or is
// closed if it has been silent for more than two intervals. No connection has
// a timer or goroutine of its own.
type wheel struct {
	mu      sync.Mutex
	pending ring
	slots   []ring
	next    int // next slot to place a connection in
	cursor  int // next slot to visit
	scratch []*conn
}

// ring is an intrusive doubly-linked list of connections.
type ring struct{ head *conn }

func (r *ring) push(c *conn) {
	c.prev, c.next = nil, r.head
	if r.head != nil {
		r.head.prev = c
	}
	r.head = c
}

func (r *ring) remove(c *conn) {
	if c.prev != nil {
		c.prev.next = c.next
	} else {
		r.head = c.next
	}
	if c.next != nil {
		c.next.prev = c.prev
	}
	c.prev, c.next = nil, nil
}

const (
	onNone    = -2
	onPending = -1
)

func newWheel(heartbeat, tick time.Duration) *wheel {
	n := max(int(heartbeat/tick), 1)
	return &wheel{slots: make([]ring, n)}
}

func (w *wheel) list(i int) *ring {
	if i == onPending {
		return &w.pending
	}
	return &w.slots[i]
}

func (w *wheel) addPending(c *conn) {
	w.mu.Lock()
	w.pending.push(c)
	c.slot = onPending
	w.mu.Unlock()
}

// promote moves c from the pending list to a slot, reporting false if c was
// already removed (closed).
func (w *wheel) promote(c *conn) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	if c.slot != onPending {
		return false
	}
	w.pending.remove(c)
	c.slot = w.next
	w.slots[w.next].push(c)
	w.next = (w.next + 1) % len(w.slots)
	return true
}

func (w *wheel) remove(c *conn) {
	w.mu.Lock()
	if c.slot != onNone {
		w.list(c.slot).remove(c)
		c.slot = onNone
	}
	w.mu.Unlock()
}

// turn visits the pending list and the next slot, returning the connections
// of each; the caller acts on them without holding the lock. The returned
// slices are reused by the next turn.
func (w *wheel) turn() (pending, slot []*conn) {
	w.mu.Lock()
	s := w.scratch[:0]
	for c := w.pending.head; c != nil; c = c.next {
		s = append(s, c)
	}
	np := len(s)
	for c := w.slots[w.cursor].head; c != nil; c = c.next {
		s = append(s, c)
	}
	w.cursor = (w.cursor + 1) % len(w.slots)
	w.scratch = s
	w.mu.Unlock()
	return s[:np], s[np:]
}
