package handler_test

import (
	"encoding/json"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/nanomesh/nanomesh/message"
)

// sent is one call an entity received.
type sent struct {
	kind  string // "push" or "response"
	route string
	mid   uint64
	data  string
	isErr bool
}

// recEntity is an in-memory session.Entity that records Push and Response
// calls (copying their data, which an Entity must not retain) and hands them
// to the test on a channel.
type recEntity struct {
	ch chan sent

	mu     sync.Mutex
	all    []sent
	closed bool
}

func newRecEntity() *recEntity { return &recEntity{ch: make(chan sent, 4096)} }

func (e *recEntity) record(s sent) error {
	e.mu.Lock()
	e.all = append(e.all, s)
	e.mu.Unlock()
	e.ch <- s
	return nil
}

func (e *recEntity) Push(route string, data []byte) error {
	return e.record(sent{kind: "push", route: route, data: string(data)})
}

func (e *recEntity) Response(mid uint64, data []byte, isError bool) error {
	return e.record(sent{kind: "response", mid: mid, data: string(data), isErr: isError})
}

func (e *recEntity) Kick(string) error { return e.Close() }

func (e *recEntity) Close() error {
	e.mu.Lock()
	e.closed = true
	e.mu.Unlock()
	return nil
}

func (e *recEntity) RemoteAddr() net.Addr { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 1} }

// next waits for the next call the entity receives.
func (e *recEntity) next(t *testing.T) sent {
	t.Helper()
	select {
	case s := <-e.ch:
		return s
	case <-time.After(5 * time.Second):
		t.Fatal("timed out waiting for a push or response")
		return sent{}
	}
}

// none checks that nothing arrives for d.
func (e *recEntity) none(t *testing.T, d time.Duration) {
	t.Helper()
	select {
	case s := <-e.ch:
		t.Fatalf("unexpected %+v", s)
	case <-time.After(d):
	}
}

// wantError waits for an error response to mid with code.
func (e *recEntity) wantError(t *testing.T, mid uint64, code int) *message.Error {
	t.Helper()
	s := e.next(t)
	if s.kind != "response" || s.mid != mid || !s.isErr {
		t.Fatalf("got %+v, want an error response to %d", s, mid)
	}
	var me message.Error
	if err := json.Unmarshal([]byte(s.data), &me); err != nil {
		t.Fatalf("error body %q: %v", s.data, err)
	}
	if me.Code != code {
		t.Fatalf("error code %d (%q), want %d", me.Code, me.Message, code)
	}
	return &me
}

// wantResponse waits for a non-error response to mid and returns its body.
func (e *recEntity) wantResponse(t *testing.T, mid uint64) string {
	t.Helper()
	s := e.next(t)
	if s.kind != "response" || s.mid != mid || s.isErr {
		t.Fatalf("got %+v, want a response to %d", s, mid)
	}
	return s.data
}

// nopEntity drops everything, for benchmarks.
type nopEntity struct{ done func() }

func (e *nopEntity) Push(string, []byte) error { return nil }
func (e *nopEntity) Response(uint64, []byte, bool) error {
	if e.done != nil {
		e.done()
	}
	return nil
}
func (*nopEntity) Kick(string) error    { return nil }
func (*nopEntity) Close() error         { return nil }
func (*nopEntity) RemoteAddr() net.Addr { return nil }
