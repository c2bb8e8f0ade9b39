// Package session holds the Session a handler sees for each client, its data
// store, the Entity interface through which a session reaches its connection
// (a local agent or, in a cluster, the gate that holds the connection) and
// groups of sessions for broadcasts.
package session

import (
	"errors"
	"fmt"
	"net"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/nanomesh/nanomesh/message"
)

// Errors returned by Session methods.
var (
	ErrClosed     = errors.New("session: closed")
	ErrIllegalUID = errors.New("session: illegal uid")
	ErrNoRequest  = errors.New("session: no request to respond to")
)

// Entity is the connection side of a session. The data passed in is already
// serialized; an Entity must not retain it after returning.
type Entity interface {
	// Push sends a server push on route.
	Push(route string, data []byte) error
	// Response answers the request with id mid; isError marks an error body.
	Response(mid uint64, data []byte, isError bool) error
	// Kick sends a Kick packet with reason, then closes the connection.
	Kick(reason string) error
	// Close closes the connection without a Kick.
	Close() error
	// RemoteAddr is the client's address.
	RemoteAddr() net.Addr
}

// Session is one client's session. Its methods are safe for concurrent use.
type Session struct {
	id      int64
	uid     atomic.Int64
	lastMID atomic.Uint64
	closed  atomic.Bool
	entity  Entity
	ser     message.Serializer

	mu      sync.RWMutex
	data    map[string]any
	onClose []closeHook

	q queue
}

// New returns a session with the given cluster-wide unique id, reaching its
// client through e and serializing payloads with ser (JSON if nil).
func New(id int64, e Entity, ser message.Serializer) *Session {
	s := &Session{}
	s.Init(id, e, ser)
	return s
}

// Init initializes a zero Session in place, for owners that embed a Session
// by value to save an allocation per connection.
func (s *Session) Init(id int64, e Entity, ser message.Serializer) {
	if ser == nil {
		ser = message.JSON
	}
	s.id, s.entity, s.ser = id, e, ser
}

// ID returns the session id, unique across the cluster.
func (s *Session) ID() int64 { return s.id }

// UID returns the user id bound with Bind, or 0.
func (s *Session) UID() int64 { return s.uid.Load() }

// Bind binds a user id (> 0) to the session.
func (s *Session) Bind(uid int64) error {
	if uid <= 0 {
		return fmt.Errorf("%w: %d", ErrIllegalUID, uid)
	}
	s.uid.Store(uid)
	if b, ok := s.entity.(Binder); ok {
		return b.Bind(s.id, uid)
	}
	return nil
}

// SetUID sets the user id without telling the entity, for owners that
// mirror a session held elsewhere.
func (s *Session) SetUID(uid int64) { s.uid.Store(uid) }

// Binder is implemented by entities that must hear of Bind, such as a
// backend's view of a session held by a gate, which tells the gate.
type Binder interface {
	Bind(sid, uid int64) error
}

// Entity returns the connection side of the session.
func (s *Session) Entity() Entity { return s.entity }

// Serializer returns the session's payload serializer.
func (s *Session) Serializer() message.Serializer { return s.ser }

// RemoteAddr returns the client's network address.
func (s *Session) RemoteAddr() net.Addr { return s.entity.RemoteAddr() }

// Push serializes v and sends it to the client as a push on route.
func (s *Session) Push(route string, v any) error {
	if s.closed.Load() {
		return ErrClosed
	}
	data, err := s.ser.Marshal(v)
	if err != nil {
		return fmt.Errorf("session: push %s: %w", route, err)
	}
	return s.entity.Push(route, data)
}

// Response answers the request being handled (the last request dispatched to
// this session) with v.
func (s *Session) Response(v any) error { return s.ResponseMID(s.lastMID.Load(), v) }

// ResponseMID answers the request with id mid with v. Use it to reply after
// the handler has returned.
func (s *Session) ResponseMID(mid uint64, v any) error {
	if mid == 0 {
		return ErrNoRequest
	}
	if s.closed.Load() {
		return ErrClosed
	}
	data, err := s.ser.Marshal(v)
	if err != nil {
		return fmt.Errorf("session: response %d: %w", mid, err)
	}
	return s.entity.Response(mid, data, false)
}

// ResponseError answers the request with id mid with a coded error.
func (s *Session) ResponseError(mid uint64, e *message.Error) error {
	if mid == 0 {
		return ErrNoRequest
	}
	if s.closed.Load() {
		return ErrClosed
	}
	return s.entity.Response(mid, message.MarshalError(s.ser, e), true)
}

// LastMID returns the id of the request being handled, or 0 for a notify.
func (s *Session) LastMID() uint64 { return s.lastMID.Load() }

// SetLastMID records the id of the message being dispatched; the dispatcher
// calls it before each handler.
func (s *Session) SetLastMID(mid uint64) { s.lastMID.Store(mid) }

// Kick sends the client a Kick with reason and closes the connection.
func (s *Session) Kick(reason string) error {
	if s.closed.Load() {
		return ErrClosed
	}
	return s.entity.Kick(reason)
}

// Close closes the client's connection without a Kick.
func (s *Session) Close() error {
	if s.closed.Load() {
		return ErrClosed
	}
	return s.entity.Close()
}

// Closed reports whether the session has ended.
func (s *Session) Closed() bool { return s.closed.Load() }

// OnClose registers fn to run once when the session ends. If the session has
// already ended, fn runs at once.
func (s *Session) OnClose(fn func(*Session)) {
	s.mu.Lock()
	if s.closed.Load() {
		s.mu.Unlock()
		fn(s)
		return
	}
	s.onClose = append(s.onClose, closeHook{fn: fn})
	s.mu.Unlock()
}

// closeHook is an OnClose callback, or the removal of the session from
// group g: one per group, taken back when the session leaves the group, so
// that a long-lived session does not collect a hook (and keep a group
// reachable) per join.
type closeHook struct {
	fn func(*Session)
	g  *Group
}

// addGroupHook registers g's removal hook unless it is there already. It
// reports false if the session has ended. Called with g.mu held.
func (s *Session) addGroupHook(g *Group) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed.Load() {
		return false
	}
	for _, h := range s.onClose {
		if h.g == g {
			return true
		}
	}
	s.onClose = append(s.onClose, closeHook{g: g})
	return true
}

// removeGroupHook takes back g's removal hook. Called with g.mu held.
func (s *Session) removeGroupHook(g *Group) {
	s.mu.Lock()
	s.onClose = slices.DeleteFunc(s.onClose, func(h closeHook) bool { return h.g == g })
	s.mu.Unlock()
}

// Release marks the session ended and runs its OnClose callbacks, in
// registration order. The session's owner calls it once when the connection
// ends; later calls do nothing.
func (s *Session) Release() {
	s.mu.Lock()
	if s.closed.Swap(true) {
		s.mu.Unlock()
		return
	}
	hooks := s.onClose
	s.onClose = nil
	s.mu.Unlock()
	for _, h := range hooks {
		if h.g != nil {
			h.g.drop(s)
		} else {
			h.fn(s)
		}
	}
}
