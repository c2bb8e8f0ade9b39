package agent

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nanomesh/nanomesh/client"
	"github.com/nanomesh/nanomesh/message"
	"github.com/nanomesh/nanomesh/packet"
	"github.com/nanomesh/nanomesh/session"
)

// ---------------------------------------------------------------------------
// The timing wheel

func TestWheelSlots(t *testing.T) {
	w := newWheel(3*time.Second, time.Second)
	if len(w.slots) != 3 {
		t.Fatalf("%d slots, want heartbeat/tick = 3", len(w.slots))
	}
	if n := len(newWheel(time.Second, 5*time.Second).slots); n != 1 {
		t.Fatalf("tick longer than the heartbeat: %d slots, want 1", n)
	}
	conns := make([]*conn, 9)
	for i := range conns {
		conns[i] = &conn{slot: onNone}
		w.addPending(conns[i])
	}
	pending, slot := w.turn()
	if len(pending) != 9 || len(slot) != 0 {
		t.Fatalf("turn: %d pending, %d in slot; want 9, 0", len(pending), len(slot))
	}
	for _, c := range conns {
		if !w.promote(c) {
			t.Fatal("promote of a pending conn failed")
		}
	}
	if w.promote(conns[0]) {
		t.Fatal("promote of a conn already promoted succeeded")
	}
	w.remove(conns[4])
	if w.promote(conns[4]) {
		t.Fatal("promote of a removed conn succeeded")
	}
	w.remove(conns[4]) // twice is harmless
	// One full revolution visits every remaining conn exactly once and no
	// pending list is left.
	seen := map[*conn]int{}
	for range len(w.slots) {
		pending, slot := w.turn()
		if len(pending) != 0 {
			t.Fatalf("%d conns still pending", len(pending))
		}
		if len(slot) < 2 || len(slot) > 3 {
			t.Errorf("slot of %d conns, want them spread 3/3/2", len(slot))
		}
		for _, c := range slot {
			seen[c]++
		}
	}
	for i, c := range conns {
		want := 1
		if i == 4 {
			want = 0
		}
		if seen[c] != want {
			t.Errorf("conn %d visited %d times per revolution, want %d", i, seen[c], want)
		}
	}
}

func TestHandshakeReplyHeartbeat(t *testing.T) {
	for _, tc := range []struct {
		opts []Option
		want int
	}{
		{nil, 30},
		{[]Option{WithHeartbeat(1500 * time.Millisecond)}, 1},
		{[]Option{WithHeartbeat(200 * time.Millisecond)}, 1}, // never 0: pitaya's client would crash
		{[]Option{WithHeartbeat(5 * time.Second)}, 5},
	} {
		s := New(nil, tc.opts...)
		var r struct {
			Code int `json:"code"`
			Sys  struct {
				Heartbeat  json.Number `json:"heartbeat"`
				ServerTime int64       `json:"servertime"`
				Serializer string      `json:"serializer"`
			} `json:"sys"`
		}
		d := json.NewDecoder(strings.NewReader(string(s.handshakeReply())))
		d.UseNumber()
		if err := d.Decode(&r); err != nil {
			t.Fatal(err)
		}
		if r.Code != 200 || r.Sys.Heartbeat.String() != strconv.Itoa(tc.want) || r.Sys.Serializer != "json" {
			t.Errorf("reply %+v, want code 200, heartbeat %d, json", r, tc.want)
		}
		if d := time.Now().Unix() - r.Sys.ServerTime; d < 0 || d > 1 {
			t.Errorf("servertime %d is %d s off", r.Sys.ServerTime, d)
		}
	}
}

// ---------------------------------------------------------------------------
// A Server with a recording handler, over real sockets

type recorder struct {
	mu       sync.Mutex
	sessions []*session.Session
	msgs     []string
	closes   map[int64]int
	onClose  chan int64
}

func newRecorder() *recorder {
	return &recorder{closes: map[int64]int{}, onClose: make(chan int64, 64)}
}

func (r *recorder) OnSession(s *session.Session) {
	r.mu.Lock()
	r.sessions = append(r.sessions, s)
	r.mu.Unlock()
}

func (r *recorder) OnMessage(s *session.Session, m *message.Message) error {
	r.mu.Lock()
	r.msgs = append(r.msgs, m.Type.String()+" "+m.Route)
	r.mu.Unlock()
	switch m.Route {
	case "echo":
		return s.ResponseMID(m.ID, json.RawMessage(m.Data)) // m.Data is valid during the call
	case "push":
		return s.Push("onPush", json.RawMessage(m.Data))
	case "fail":
		return errors.New("handler says no")
	case "flood":
		return session.ErrQueueFull
	}
	return nil
}

func (r *recorder) OnClose(s *session.Session) {
	r.mu.Lock()
	r.closes[s.ID()]++
	r.mu.Unlock()
	r.onClose <- s.ID()
}

func startServer(t *testing.T, h Handler, opts ...Option) *Server {
	t.Helper()
	s := New(h, append([]Option{WithTCP("127.0.0.1:0"), WithWS("127.0.0.1:0"), WithPollers(2)}, opts...)...)
	if err := s.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := s.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
	})
	return s
}

func addrs(s *Server) map[string]string {
	return map[string]string{"tcp": "tcp://" + s.TCPAddr(), "ws": "ws://" + s.WSAddr() + s.WSPath()}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestServerSessions(t *testing.T) {
	rec := newRecorder()
	var outbound atomic.Int64
	s := startServer(t, rec, WithOutbound(func(_ *session.Session, m *message.Message) error {
		outbound.Add(1)
		if m.Type == message.Push && m.Route == "onSecret" {
			return errors.New("dropped")
		}
		return nil
	}))
	for name, addr := range addrs(s) {
		t.Run(name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			c, err := client.Dial(ctx, addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			var got map[string]string
			if err := c.Request(ctx, "echo", map[string]string{"k": name}, &got); err != nil || got["k"] != name {
				t.Fatalf("echo: %v, %v", got, err)
			}
			pushes := c.Pushes("onPush", 1)
			if err := c.Notify(ctx, "push", map[string]string{"p": name}); err != nil {
				t.Fatal(err)
			}
			select {
			case p := <-pushes:
				if string(p) != `{"p":"`+name+`"}` {
					t.Errorf("push %s", p)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("no push")
			}

			// The session is in the table while connected.
			rec.mu.Lock()
			sess := rec.sessions[len(rec.sessions)-1]
			rec.mu.Unlock()
			if got, ok := s.Session(sess.ID()); !ok || got != sess {
				t.Fatalf("Session(%d) = %v, %t", sess.ID(), got, ok)
			}
			if sess.RemoteAddr().String() != c.LocalAddr().String() {
				t.Errorf("remote addr %s, want %s", sess.RemoteAddr(), c.LocalAddr())
			}
			found := false
			s.Range(func(x *session.Session) bool { found = found || x == sess; return true })
			if !found {
				t.Error("Range does not list the session")
			}
			// An outbound hook error drops the message, the session lives.
			before := outbound.Load()
			if err := sess.Push("onSecret", "x"); err == nil {
				t.Error("push dropped by the outbound hook reported no error")
			}
			if outbound.Load() != before+1 {
				t.Error("outbound hook not run")
			}

			c.Close()
			select {
			case id := <-rec.onClose:
				if id != sess.ID() {
					t.Fatalf("OnClose for session %d, want %d", id, sess.ID())
				}
			case <-time.After(5 * time.Second):
				t.Fatal("OnClose not called")
			}
			if _, ok := s.Session(sess.ID()); ok {
				t.Error("closed session still in the table")
			}
			if !sess.Closed() {
				t.Error("session not marked closed")
			}
			if err := sess.Push("onPush", "late"); !errors.Is(err, session.ErrClosed) {
				t.Errorf("push to a closed session: %v, want ErrClosed", err)
			}
			waitFor(t, "no connections", func() bool { return s.Count() == 0 && s.Sessions() == 0 })
		})
	}
	rec.mu.Lock()
	defer rec.mu.Unlock()
	for id, n := range rec.closes {
		if n != 1 {
			t.Errorf("OnClose called %d times for session %d", n, id)
		}
	}
	if len(rec.closes) != 2 || len(rec.sessions) != 2 {
		t.Errorf("%d sessions, %d closes, want 2 each", len(rec.sessions), len(rec.closes))
	}
}

// readKick reads from c until it ends and returns the Kick reasons seen.
func readKick(t *testing.T, c *client.Conn) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var kicks []string
	for {
		typ, body, err := c.ReadPacket(ctx)
		if err != nil {
			if ctx.Err() != nil {
				t.Fatalf("connection still open (kicks %q)", kicks)
			}
			return kicks
		}
		if typ == packet.Kick {
			var k struct {
				Reason string `json:"reason"`
			}
			_ = json.Unmarshal(body, &k)
			kicks = append(kicks, k.Reason)
		}
	}
}

func TestServerHandlerErrorsClose(t *testing.T) {
	rec := newRecorder()
	s := startServer(t, rec)
	for name, addr := range addrs(s) {
		for route, reason := range map[string]string{"fail": "handler says no", "flood": ReasonTooManyPending} {
			t.Run(name+"/"+route, func(t *testing.T) {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				c, err := client.DialRaw(ctx, addr)
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				if _, err := c.Handshake(ctx); err != nil {
					t.Fatal(err)
				}
				body, _ := message.Encode(&message.Message{Type: message.Notify, Route: route}, nil)
				if err := c.WritePacket(packet.Data, body); err != nil {
					t.Fatal(err)
				}
				if k := readKick(t, c); len(k) != 1 || k[0] != reason {
					t.Errorf("kicks %q, want [%q]", k, reason)
				}
			})
		}
	}
	waitFor(t, "no connections", func() bool { return s.Count() == 0 && s.Sessions() == 0 })
}

func TestServerShutdownKicksEveryone(t *testing.T) {
	rec := newRecorder()
	s := New(rec, WithTCP("127.0.0.1:0"), WithWS("127.0.0.1:0"))
	if err := s.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var conns []*client.Conn
	for _, addr := range addrs(s) {
		for _, hs := range []bool{true, false} { // a session, and a connection that never handshakes
			c, err := client.DialRaw(ctx, addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if hs {
				if _, err := c.Handshake(ctx); err != nil {
					t.Fatal(err)
				}
			}
			conns = append(conns, c)
		}
	}
	waitFor(t, "4 connections, 2 sessions", func() bool { return s.Count() == 4 && s.Sessions() == 2 })
	if err := s.Shutdown(ctx); err != nil {
		t.Fatalf("shutdown: %v", err)
	}
	for i, c := range conns {
		if k := readKick(t, c); len(k) != 1 || k[0] != ReasonShutdown {
			t.Errorf("conn %d: kicks %q, want [shutdown]", i, k)
		}
	}
	if s.Count() != 0 || s.Sessions() != 0 {
		t.Errorf("after shutdown: %d connections, %d sessions", s.Count(), s.Sessions())
	}
	if _, err := client.DialRaw(ctx, "tcp://"+s.TCPAddr()); err == nil {
		t.Error("TCP connection accepted after shutdown")
	}
}

func TestServerStartWithoutListener(t *testing.T) {
	if err := New(newRecorder()).Start(context.Background()); err == nil {
		t.Fatal("Start with no listener succeeded")
	}
}

func TestServerWebSocketOptions(t *testing.T) {
	rec := newRecorder()
	s := startServer(t, rec,
		WithWSPath("/game"),
		WithCheckOrigin(func(r *http.Request) bool { return r.Header.Get("Origin") != "http://evil.example" }),
		WithHTTP("/hello", http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "hi") })))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := http.Get("http://" + s.WSAddr() + "/hello")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(b) != "hi" {
		t.Errorf("GET /hello = %q", b)
	}
	if _, err := client.DialRaw(ctx, "ws://"+s.WSAddr()+"/nano"); err == nil {
		t.Error("upgrade accepted on the default path, want only /game")
	}
	if _, err := client.DialRaw(ctx, "ws://"+s.WSAddr()+"/game", client.WithHeader(http.Header{"Origin": {"http://evil.example"}})); err == nil {
		t.Error("upgrade accepted from a refused origin")
	}
	c, err := client.Dial(ctx, "ws://"+s.WSAddr()+"/game", client.WithHeader(http.Header{"Origin": {"http://good.example"}}))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Request(ctx, "echo", "x", nil); err != nil {
		t.Fatal(err)
	}
}
