package session

import (
	"errors"
	"fmt"
	"sync"

	"github.com/nanomesh/nanomesh/message"
)

// Errors returned by Group methods.
var (
	ErrMemberExists   = errors.New("session: already a member of the group")
	ErrMemberNotFound = errors.New("session: not a member of the group")
	ErrGroupClosed    = errors.New("session: group closed")
)

// BatchPusher is implemented by entities that can deliver one push to many
// sessions in one call, such as a gate reached over the network. A group
// hands every member whose entity reports the same BatchKey to one
// PushBatch call instead of pushing to each.
type BatchPusher interface {
	Entity
	// BatchKey identifies the batch (for example the gate's node id).
	BatchKey() string
	// PushBatch sends the push to all sessions in ids.
	PushBatch(ids []int64, route string, data []byte) error
}

// Group is a named set of sessions that receive broadcasts together. A
// member leaves the group automatically when its session ends. The payload of
// a broadcast is serialized once, whatever the number of members.
type Group struct {
	name string
	ser  message.Serializer

	mu      sync.RWMutex
	members map[int64]*Session
	closed  bool
}

// NewGroup returns an empty group whose broadcasts are serialized with ser
// (JSON if nil).
func NewGroup(name string, ser message.Serializer) *Group {
	if ser == nil {
		ser = message.JSON
	}
	return &Group{name: name, ser: ser, members: make(map[int64]*Session)}
}

// Name returns the group's name.
func (g *Group) Name() string { return g.name }

// Add adds s to the group.
func (g *Group) Add(s *Session) error {
	g.mu.Lock()
	if g.closed {
		g.mu.Unlock()
		return ErrGroupClosed
	}
	if _, ok := g.members[s.ID()]; ok {
		g.mu.Unlock()
		return fmt.Errorf("%w: session %d in %q", ErrMemberExists, s.ID(), g.name)
	}
	// The hook is registered under g.mu so that a concurrent Leave cannot
	// take it back after this Add's member was stored.
	if s.addGroupHook(g) {
		g.members[s.ID()] = s
	} // else the session has ended: it is not kept
	g.mu.Unlock()
	return nil
}

// drop removes s if it is still the member under its id.
func (g *Group) drop(s *Session) {
	g.mu.Lock()
	if g.members[s.ID()] == s {
		delete(g.members, s.ID())
	}
	g.mu.Unlock()
}

// Leave removes s from the group.
func (g *Group) Leave(s *Session) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	m, ok := g.members[s.ID()]
	if !ok {
		return fmt.Errorf("%w: session %d in %q", ErrMemberNotFound, s.ID(), g.name)
	}
	delete(g.members, s.ID())
	m.removeGroupHook(g)
	return nil
}

// LeaveAll removes every member.
func (g *Group) LeaveAll() {
	g.mu.Lock()
	g.clearLocked()
	g.mu.Unlock()
}

// Close removes every member and refuses later Adds and broadcasts.
func (g *Group) Close() {
	g.mu.Lock()
	g.closed = true
	g.clearLocked()
	g.mu.Unlock()
}

func (g *Group) clearLocked() {
	for _, s := range g.members {
		s.removeGroupHook(g)
	}
	clear(g.members)
}

// Contains reports whether the session with id is a member.
func (g *Group) Contains(id int64) bool {
	g.mu.RLock()
	_, ok := g.members[id]
	g.mu.RUnlock()
	return ok
}

// Member returns the member session with id.
func (g *Group) Member(id int64) (*Session, bool) {
	g.mu.RLock()
	s, ok := g.members[id]
	g.mu.RUnlock()
	return s, ok
}

// Members returns the ids of the members.
func (g *Group) Members() []int64 {
	g.mu.RLock()
	ids := make([]int64, 0, len(g.members))
	for id := range g.members {
		ids = append(ids, id)
	}
	g.mu.RUnlock()
	return ids
}

// Count returns the number of members.
func (g *Group) Count() int {
	g.mu.RLock()
	n := len(g.members)
	g.mu.RUnlock()
	return n
}

// Broadcast pushes v on route to every member.
func (g *Group) Broadcast(route string, v any) error { return g.Multicast(route, v, nil) }

// Multicast pushes v on route to every member for which filter returns true
// (all members if filter is nil). It serializes v once, pushes outside the
// group's lock, and returns the first push error after trying every member.
func (g *Group) Multicast(route string, v any, filter func(*Session) bool) error {
	data, err := g.ser.Marshal(v)
	if err != nil {
		return fmt.Errorf("session: group %q: %w", g.name, err)
	}
	ss := snapshots.Get().(*[]*Session)
	defer func() { clear(*ss); *ss = (*ss)[:0]; snapshots.Put(ss) }()
	g.mu.RLock()
	if g.closed {
		g.mu.RUnlock()
		return ErrGroupClosed
	}
	for _, s := range g.members {
		if filter == nil || filter(s) {
			*ss = append(*ss, s)
		}
	}
	g.mu.RUnlock()

	var first error
	var batches map[string]*batch
	for _, s := range *ss {
		if bp, ok := s.entity.(BatchPusher); ok {
			if batches == nil {
				batches = make(map[string]*batch)
			}
			b := batches[bp.BatchKey()]
			if b == nil {
				b = &batch{bp: bp}
				batches[bp.BatchKey()] = b
			}
			b.ids = append(b.ids, s.ID())
			continue
		}
		if s.closed.Load() {
			continue
		}
		if err := s.entity.Push(route, data); err != nil && first == nil {
			first = err
		}
	}
	for _, b := range batches {
		if err := b.bp.PushBatch(b.ids, route, data); err != nil && first == nil {
			first = err
		}
	}
	return first
}

type batch struct {
	bp  BatchPusher
	ids []int64
}

var snapshots = sync.Pool{New: func() any { s := make([]*Session, 0, 64); return &s }}
