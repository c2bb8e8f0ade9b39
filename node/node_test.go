package node_test

// End-to-end tests of a single node (no etcd) over real sockets, TCP and
// WebSocket: handshake, request/notify/push, error responses, heartbeats,
// protocol abuse, backpressure, flooding, graceful shutdown and concurrency.

import (
	"bufio"
	"bytes"
	"compress/zlib"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nanomesh/nanomesh/agent"
	"github.com/nanomesh/nanomesh/client"
	"github.com/nanomesh/nanomesh/handler"
	"github.com/nanomesh/nanomesh/message"
	"github.com/nanomesh/nanomesh/node"
	"github.com/nanomesh/nanomesh/packet"
	"github.com/nanomesh/nanomesh/session"
)

// ---------------------------------------------------------------------------
// Helpers

type transport struct {
	name string
	addr func(*node.Node) string
}

var transports = []transport{
	{"tcp", func(n *node.Node) string { return "tcp://" + n.TCPAddr() }},
	{"ws", func(n *node.Node) string { return "ws://" + n.WSAddr() + "/nano" }},
}

// startTestNode starts a node listening on TCP and WebSocket with opts and
// shuts it down when the test ends.
func startTestNode(t *testing.T, opts ...node.Option) *node.Node {
	t.Helper()
	n := node.New(append([]node.Option{
		node.WithTCPAddr("127.0.0.1:0"),
		node.WithWSAddr("127.0.0.1:0"),
	}, opts...)...)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := n.Start(ctx); err != nil {
		t.Fatalf("start: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := n.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
	})
	return n
}

func dial(t *testing.T, addr string, opts ...client.Option) *client.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := client.Dial(ctx, addr, opts...)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func dialRaw(t *testing.T, addr string, opts ...client.Option) *client.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := client.DialRaw(ctx, addr, opts...)
	if err != nil {
		t.Fatalf("dial raw %s: %v", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// handshake completes the protocol handshake on a raw connection.
func handshake(t *testing.T, c *client.Conn) client.HandshakeInfo {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	info, err := c.Handshake(ctx)
	if err != nil {
		t.Fatalf("handshake: %v", err)
	}
	return info
}

func request(t *testing.T, c *client.Client, route string, req, resp any) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return c.Request(ctx, route, req, resp)
}

func notify(t *testing.T, c *client.Client, route string, v any) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := c.Notify(ctx, route, v); err != nil {
		t.Fatalf("notify %s: %v", route, err)
	}
}

// eventually polls cond until it holds or the deadline passes.
func eventually(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// recv receives from ch or fails the test after timeout.
func recv[T any](t *testing.T, ch <-chan T, timeout time.Duration, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(timeout):
		t.Fatalf("timed out after %v waiting for %s", timeout, what)
		panic("unreachable")
	}
}

// ending is what a raw connection saw until the server closed it.
type ending struct {
	heartbeats int       // Heartbeat packets before the end
	kicks      []string  // reasons of the Kick packets
	kickBody   []byte    // body of the first Kick
	kickedAt   time.Time // when the first Kick arrived
	others     []packet.Type
	err        error // how the stream ended
}

// readToEnd reads packets until the connection ends, failing the test if it
// is still open after timeout.
func readToEnd(t *testing.T, c *client.Conn, timeout time.Duration) ending {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var e ending
	for {
		typ, body, err := c.ReadPacket(ctx)
		if err != nil {
			if ctx.Err() != nil {
				t.Fatalf("connection still open after %v (saw %d heartbeats, kicks %q, others %v)",
					timeout, e.heartbeats, e.kicks, e.others)
			}
			e.err = err
			return e
		}
		switch typ {
		case packet.Heartbeat:
			e.heartbeats++
		case packet.Kick:
			var k struct {
				Reason string `json:"reason"`
			}
			if err := json.Unmarshal(body, &k); err != nil {
				t.Errorf("kick body %q: %v", body, err)
			}
			if len(e.kicks) == 0 {
				e.kickBody, e.kickedAt = body, time.Now()
			}
			e.kicks = append(e.kicks, k.Reason)
		default:
			e.others = append(e.others, typ)
		}
	}
}

// expectKick reads until the server closes c and checks that it sent exactly
// one Kick, with reason, before closing.
func expectKick(t *testing.T, c *client.Conn, reason string, timeout time.Duration) ending {
	t.Helper()
	e := readToEnd(t, c, timeout)
	if len(e.kicks) != 1 || e.kicks[0] != reason {
		t.Fatalf("kicks = %q, want [%q] (connection ended with %v)", e.kicks, reason, e.err)
	}
	if isKickErr(e.err) {
		t.Fatalf("unexpected end %v", e.err)
	}
	return e
}

func isKickErr(err error) bool { return errors.Is(err, client.ErrKicked) }

// kickReason waits until c ends and returns the reason it was kicked with.
func kickReason(t *testing.T, c *client.Client, timeout time.Duration) string {
	t.Helper()
	recv(t, c.Done(), timeout, "the client to be disconnected")
	reason, ok := c.Kicked()
	if !ok {
		t.Fatalf("client ended without a kick: %v", c.Err())
	}
	return reason
}

func codeOf(t *testing.T, err error) *client.Error {
	t.Helper()
	var ce *client.Error
	if !errors.As(err, &ce) {
		t.Fatalf("error %v (%T) is not a *client.Error", err, err)
	}
	return ce
}

// dataPacket encodes m as a whole Data packet.
func dataPacket(t *testing.T, m *message.Message, dict *message.Dictionary) []byte {
	t.Helper()
	body, err := message.Encode(m, dict)
	if err != nil {
		t.Fatal(err)
	}
	p, err := packet.Encode(packet.Data, body)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func zlibBytes(t *testing.T, b []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	w := zlib.NewWriter(&buf)
	if _, err := w.Write(b); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// ---------------------------------------------------------------------------
// Components

type Req struct {
	Msg  string `json:"msg"`
	Seq  int    `json:"seq"`
	N    int    `json:"n"`
	Size int    `json:"size"`
}

type Resp struct {
	Msg    string `json:"msg"`
	SID    int64  `json:"sid"`
	Seq    int    `json:"seq"`
	After  bool   `json:"after"`
	Pushed int    `json:"pushed"`
}

// Game is the general-purpose test component, routes "game.*".
type Game struct {
	handler.Base
	notes    chan string   // Note sends every msg here
	entered  chan int64    // Slow and Block report their session here on entry
	release  chan struct{} // Slow and Block wait on it
	floodErr chan error    // Flood reports how it ended
	events   *eventLog     // Slow records "slow.done" here, if set
}

func newGame() *Game {
	return &Game{
		notes:    make(chan string, 1024),
		entered:  make(chan int64, 1024),
		release:  make(chan struct{}),
		floodErr: make(chan error, 16),
	}
}

var gameOpts = []handler.Option{handler.WithName("game"), handler.WithNameFunc(handler.LowerFirst)}

func (g *Game) Echo(s *session.Session, r *Req) error {
	return s.Response(&Resp{Msg: r.Msg, SID: s.ID(), Seq: r.Seq})
}

func (g *Game) Note(s *session.Session, r *Req) error {
	g.notes <- r.Msg
	return nil
}

func (g *Game) PushMe(s *session.Session, r *Req) error {
	if err := s.Push("onPush", &Resp{Msg: r.Msg}); err != nil {
		return err
	}
	return s.Response(&Resp{Msg: "pushed"})
}

// Later answers after the handler has returned, through ResponseMID.
func (g *Game) Later(s *session.Session, r *Req) error {
	mid := s.LastMID()
	var returned atomic.Bool
	done := make(chan struct{})
	go func() {
		<-done
		_ = s.ResponseMID(mid, &Resp{Msg: r.Msg, After: returned.Load()})
	}()
	defer func() { returned.Store(true); close(done) }()
	return nil
}

func (g *Game) Fail(s *session.Session, _ []byte) error { return errors.New("disk on fire") }

func (g *Game) Teapot(s *session.Session, _ []byte) error {
	return message.NewError(418, "short and stout")
}

func (g *Game) Panic(s *session.Session, _ []byte) error { panic("kaboom") }

func (g *Game) Slow(s *session.Session, r *Req) error {
	g.entered <- s.ID()
	<-g.release
	if g.events != nil {
		g.events.add("slow.done")
	}
	return s.Response(&Resp{Msg: r.Msg})
}

func (g *Game) Block(s *session.Session, _ []byte) error {
	g.entered <- s.ID()
	<-g.release
	return nil
}

// Flood pushes r.N pushes of r.Size bytes, stopping at the first failure.
func (g *Game) Flood(s *session.Session, r *Req) error {
	g.entered <- s.ID()
	payload := bytes.Repeat([]byte{'x'}, r.Size)
	for i := 0; i < r.N; i++ {
		if err := s.Push("onFlood", payload); err != nil {
			g.floodErr <- err
			return err
		}
	}
	g.floodErr <- nil
	return s.Response(&Resp{Pushed: r.N})
}

// ---------------------------------------------------------------------------
// 1. Handshake

func TestHandshakeFields(t *testing.T) {
	n := startTestNode(t,
		node.WithComponent(newGame(), gameOpts...),
		node.WithAgent(agent.WithHeartbeat(2*time.Second)))
	for _, tr := range transports {
		t.Run(tr.name, func(t *testing.T) {
			before := time.Now()
			c := dial(t, tr.addr(n))
			after := time.Now()
			info := c.Handshake()
			if info.Code != 200 {
				t.Errorf("code = %d, want 200", info.Code)
			}
			if info.Heartbeat != 2*time.Second {
				t.Errorf("heartbeat = %v, want 2s", info.Heartbeat)
			}
			if info.Serializer != "json" {
				t.Errorf("serializer = %q, want json", info.Serializer)
			}
			if info.ServerTime.Before(before.Truncate(time.Second)) || info.ServerTime.After(after) {
				t.Errorf("servertime = %v, want within [%v, %v]", info.ServerTime, before, after)
			}
			if info.Dict != nil {
				t.Errorf("dict = %v, want none without route compression", info.Dict)
			}
			// The raw reply: heartbeat an integer (pitaya's client needs
			// one), no dict member at all.
			d := json.NewDecoder(bytes.NewReader(info.Raw))
			d.UseNumber()
			var raw struct {
				Code int                        `json:"code"`
				Sys  map[string]json.RawMessage `json:"sys"`
			}
			if err := d.Decode(&raw); err != nil {
				t.Fatalf("reply %s: %v", info.Raw, err)
			}
			if got := string(raw.Sys["heartbeat"]); got != "2" {
				t.Errorf("raw heartbeat = %s, want the integer 2 (reply %s)", got, info.Raw)
			}
			if _, ok := raw.Sys["dict"]; ok {
				t.Errorf("reply has a dict without route compression: %s", info.Raw)
			}
			var st int64
			if err := json.Unmarshal(raw.Sys["servertime"], &st); err != nil {
				t.Errorf("servertime %s is not an integer: %v", raw.Sys["servertime"], err)
			}
			var resp Resp
			if err := request(t, c, "game.echo", &Req{Msg: "hi"}, &resp); err != nil || resp.Msg != "hi" {
				t.Fatalf("echo = %+v, %v", resp, err)
			}
			// Without a dictionary, a push carries its route in full.
			rc := dialRaw(t, tr.addr(n))
			handshake(t, rc)
			if err := rc.WriteRaw(dataPacket(t, &message.Message{Type: message.Request, ID: 1,
				Route: "game.pushMe", Data: []byte(`{"msg":"plain"}`)}, nil)); err != nil {
				t.Fatal(err)
			}
			body := readData(t, rc)
			if body[0] != byte(message.Push)<<1 || int(body[1]) != len("onPush") || string(body[2:8]) != "onPush" {
				t.Errorf("push = % x, want flag 0x06 and the plain route", body[:min(len(body), 8)])
			}
		})
	}
}

// readData reads the next Data packet from c, skipping heartbeats.
func readData(t *testing.T, c *client.Conn) []byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for {
		typ, body, err := c.ReadPacket(ctx)
		if err != nil {
			t.Fatalf("read: %v", err)
		}
		switch typ {
		case packet.Heartbeat:
			continue
		case packet.Data:
			return body
		}
		t.Fatalf("got %s packet %q, want Data", typ, body)
	}
}

func TestHandshakeRouteCompression(t *testing.T) {
	const pushCode = 1000
	n := startTestNode(t,
		node.WithComponent(newGame(), gameOpts...),
		node.WithRouteCompression(),
		node.WithDictionary(map[string]uint16{"onPush": pushCode}))
	for _, tr := range transports {
		t.Run(tr.name, func(t *testing.T) {
			c := dial(t, tr.addr(n))
			dict := c.Handshake().Dict
			for _, r := range n.Registry().Routes() {
				if dict[r] == 0 {
					t.Errorf("route %q has no code in dict %v", r, dict)
				}
			}
			if dict["onPush"] != pushCode {
				t.Errorf("dict[onPush] = %d, want %d", dict["onPush"], pushCode)
			}
			// The client compresses its routes by default.
			pushes := c.Pushes("onPush", 1)
			var resp Resp
			if err := request(t, c, "game.pushMe", &Req{Msg: "zip"}, &resp); err != nil || resp.Msg != "pushed" {
				t.Fatalf("pushMe = %+v, %v", resp, err)
			}
			var pr Resp
			if err := json.Unmarshal(recv(t, pushes, 5*time.Second, "push"), &pr); err != nil || pr.Msg != "zip" {
				t.Errorf("push = %+v, %v", pr, err)
			}

			// Raw bytes both ways: a request with a 2-byte route code in, a
			// push with the 2-byte code out.
			rc := dialRaw(t, tr.addr(n))
			info := handshake(t, rc)
			code := info.Dict["game.pushMe"]
			req := []byte{byte(message.Request)<<1 | message.FlagRouteCompressed, 7, byte(code >> 8), byte(code)}
			req = append(req, `{"msg":"raw"}`...)
			p, _ := packet.Encode(packet.Data, req)
			if err := rc.WriteRaw(p); err != nil {
				t.Fatal(err)
			}
			push := readData(t, rc)
			wantFlag := byte(message.Push)<<1 | message.FlagRouteCompressed
			if len(push) < 3 || push[0] != wantFlag || push[1] != pushCode>>8 || push[2] != pushCode&0xff {
				t.Fatalf("push = % x, want flag %#x and code % x", push, wantFlag, []byte{pushCode >> 8, pushCode & 0xff})
			}
			if !bytes.HasPrefix(push[3:], []byte(`{"msg":"raw"`)) {
				t.Errorf("push payload = %q", push[3:])
			}
			res := readData(t, rc)
			if res[0] != byte(message.Response)<<1 || res[1] != 7 {
				t.Errorf("response = % x, want flag 0x04 id 7", res)
			}
		})
	}
}

// ---------------------------------------------------------------------------
// 2. Request, notify, push, late response

func TestRequestNotifyPush(t *testing.T) {
	g := newGame()
	n := startTestNode(t, node.WithComponent(g, gameOpts...))
	for _, tr := range transports {
		t.Run(tr.name, func(t *testing.T) {
			c := dial(t, tr.addr(n))

			// Many concurrent requests on one client: each response matches
			// its request.
			const N = 200
			var wg sync.WaitGroup
			errs := make(chan error, N)
			for i := range N {
				wg.Go(func() {
					var resp Resp
					msg := fmt.Sprintf("m-%d", i)
					if err := request(t, c, "game.echo", &Req{Msg: msg, Seq: i}, &resp); err != nil {
						errs <- err
					} else if resp.Msg != msg || resp.Seq != i {
						errs <- fmt.Errorf("request %d got response %+v", i, resp)
					}
				})
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Error(err)
			}

			// Notify runs the handler.
			notify(t, c, "game.note", &Req{Msg: "note-" + tr.name})
			if got := recv(t, g.notes, 5*time.Second, "notify handler"); got != "note-"+tr.name {
				t.Errorf("notify handler got %q", got)
			}

			// A push arrives.
			pushes := c.Pushes("onPush", 1)
			if err := request(t, c, "game.pushMe", &Req{Msg: "p"}, nil); err != nil {
				t.Fatal(err)
			}
			var pr Resp
			if err := json.Unmarshal(recv(t, pushes, 5*time.Second, "push"), &pr); err != nil || pr.Msg != "p" {
				t.Errorf("push = %+v, %v", pr, err)
			}

			// A response sent after the handler returned, with ResponseMID.
			var lr Resp
			if err := request(t, c, "game.later", &Req{Msg: "late"}, &lr); err != nil {
				t.Fatal(err)
			}
			if lr.Msg != "late" || !lr.After {
				t.Errorf("late response = %+v, want msg late, sent after the handler returned", lr)
			}
		})
	}
}

// ---------------------------------------------------------------------------
// 3. Error responses

func TestErrorResponses(t *testing.T) {
	n := startTestNode(t, node.WithComponent(newGame(), gameOpts...))
	for _, tr := range transports {
		t.Run(tr.name, func(t *testing.T) {
			c := dial(t, tr.addr(n))
			cases := []struct {
				route   string
				req     any
				code    int
				message string
			}{
				{"game.nope", nil, 404, `route "game.nope" not found`},
				{"nope", nil, 404, `route "nope" not found`},
				{"game.echo", []byte(`{not json`), 400, "bad request body"},
				{"game.fail", nil, 500, "disk on fire"},
				{"game.teapot", nil, 418, "short and stout"},
				{"game.panic", nil, 500, "internal error"},
			}
			for _, tc := range cases {
				err := request(t, c, tc.route, tc.req, nil)
				if err == nil {
					t.Errorf("%s: no error, want %d", tc.route, tc.code)
					continue
				}
				ce := codeOf(t, err)
				if ce.Code != tc.code || !strings.Contains(ce.Message, tc.message) {
					t.Errorf("%s: error %d %q, want %d containing %q", tc.route, ce.Code, ce.Message, tc.code, tc.message)
				}
				// The session lives on after every error, panics included.
				var resp Resp
				if err := request(t, c, "game.echo", &Req{Msg: "still here"}, &resp); err != nil || resp.Msg != "still here" {
					t.Fatalf("after %s: echo = %+v, %v", tc.route, resp, err)
				}
			}
			if r, kicked := c.Kicked(); kicked {
				t.Errorf("kicked: %q", r)
			}
		})
	}
}

// ---------------------------------------------------------------------------
// 4. Heartbeat

func TestHeartbeat(t *testing.T) {
	n := startTestNode(t,
		node.WithComponent(newGame(), gameOpts...),
		node.WithAgent(agent.WithHeartbeat(time.Second)))
	for _, tr := range transports {
		t.Run(tr.name+"/silent-client-kicked", func(t *testing.T) {
			t.Parallel()
			c := dialRaw(t, tr.addr(n))
			info := handshake(t, c)
			if info.Heartbeat != time.Second {
				t.Fatalf("heartbeat = %v", info.Heartbeat)
			}
			start := time.Now()
			e := expectKick(t, c, "heartbeat timeout", 6*time.Second)
			if e.heartbeats < 1 {
				t.Errorf("no server heartbeat before the kick")
			}
			// Silent for more than 2 x 1 s, checked on a 1 s tick.
			if d := e.kickedAt.Sub(start); d < 1900*time.Millisecond || d > 4*time.Second {
				t.Errorf("kicked after %v of silence, want more than 2 s and about 3 s at most", d)
			}
			if len(e.others) > 0 {
				t.Errorf("unexpected packets %v", e.others)
			}
		})
		t.Run(tr.name+"/silent-client-kicked-client", func(t *testing.T) {
			t.Parallel()
			c := dial(t, tr.addr(n), client.WithHeartbeat(false))
			if r := kickReason(t, c, 6*time.Second); r != "heartbeat timeout" {
				t.Errorf("kick reason %q", r)
			}
		})
		t.Run(tr.name+"/heartbeating-client-stays", func(t *testing.T) {
			t.Parallel()
			c := dial(t, tr.addr(n))
			select {
			case <-c.Done():
				t.Fatalf("heartbeating client disconnected: %v", c.Err())
			case <-time.After(3500 * time.Millisecond):
			}
			var resp Resp
			if err := request(t, c, "game.echo", &Req{Msg: "alive"}, &resp); err != nil || resp.Msg != "alive" {
				t.Fatalf("echo = %+v, %v", resp, err)
			}
		})
	}
}

// ---------------------------------------------------------------------------
// 5. Handshake state machine

type userToken struct {
	Token string `json:"token"`
}

func TestHandshakeStateMachine(t *testing.T) {
	g := newGame()
	n := startTestNode(t,
		node.WithComponent(g, gameOpts...),
		node.WithAgent(
			agent.WithHandshakeTimeout(300*time.Millisecond),
			agent.WithTick(50*time.Millisecond),
			agent.WithValidator(func(h *agent.Handshake) error {
				var u userToken
				if len(h.User) > 0 {
					if err := json.Unmarshal(h.User, &u); err != nil {
						return message.NewError(400, "bad user")
					}
				}
				switch u.Token {
				case "ok":
					return nil
				case "":
					return errors.New("token required")
				}
				return message.NewError(403, "bad token %q", u.Token)
			})))
	notePacket := dataPacket(t, &message.Message{Type: message.Notify, Route: "game.note", Data: []byte(`{"msg":"early"}`)}, nil)
	for _, tr := range transports {
		t.Run(tr.name, func(t *testing.T) {
			t.Run("handshake-timeout", func(t *testing.T) {
				t.Parallel()
				c := dialRaw(t, tr.addr(n))
				start := time.Now()
				e := expectKick(t, c, "handshake timeout", 3*time.Second)
				if d := e.kickedAt.Sub(start); d < 200*time.Millisecond || d > 2*time.Second {
					t.Errorf("kicked after %v, want about 300 ms", d)
				}
				if !errors.Is(e.err, io.EOF) && tr.name == "tcp" {
					t.Errorf("ended with %v, want EOF", e.err)
				}
			})
			t.Run("data-before-handshake", func(t *testing.T) {
				t.Parallel()
				c := dialRaw(t, tr.addr(n))
				if err := c.WriteRaw(notePacket); err != nil {
					t.Fatal(err)
				}
				expectKick(t, c, "data before handshake", 3*time.Second)
			})
			t.Run("data-before-ack", func(t *testing.T) {
				t.Parallel()
				c := dialRaw(t, tr.addr(n), client.WithUser(userToken{"ok"}))
				if err := c.WritePacket(packet.Handshake, []byte(`{"user":{"token":"ok"}}`)); err != nil {
					t.Fatal(err)
				}
				ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
				defer cancel()
				typ, body, err := c.ReadPacket(ctx)
				if err != nil || typ != packet.Handshake || !bytes.Contains(body, []byte(`"code":200`)) {
					t.Fatalf("handshake reply %s %s, %v", typ, body, err)
				}
				if err := c.WriteRaw(notePacket); err != nil {
					t.Fatal(err)
				}
				expectKick(t, c, "data before handshake", 3*time.Second)
			})
			t.Run("validator", func(t *testing.T) {
				t.Parallel()
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				for _, tc := range []struct {
					user    any
					code    int
					message string
				}{
					{userToken{"nope"}, 403, `bad token "nope"`},
					{nil, 401, "token required"},
				} {
					_, err := client.Dial(ctx, tr.addr(n), client.WithUser(tc.user))
					if err == nil {
						t.Fatalf("user %v: handshake accepted", tc.user)
					}
					if ce := codeOf(t, err); ce.Code != tc.code || ce.Message != tc.message {
						t.Errorf("user %v: refused with %d %q, want %d %q", tc.user, ce.Code, ce.Message, tc.code, tc.message)
					}
				}
				// Raw: the refusal is a Handshake packet, then the server closes.
				c := dialRaw(t, tr.addr(n))
				if err := c.WritePacket(packet.Handshake, []byte(`{"user":{"token":"x"}}`)); err != nil {
					t.Fatal(err)
				}
				typ, body, err := c.ReadPacket(ctx)
				if err != nil || typ != packet.Handshake {
					t.Fatalf("refusal %s %s, %v", typ, body, err)
				}
				var r struct {
					Code    int    `json:"code"`
					Message string `json:"message"`
				}
				if err := json.Unmarshal(body, &r); err != nil || r.Code != 403 || r.Message != `bad token "x"` {
					t.Errorf("refusal %s: %+v, %v", body, r, err)
				}
				if e := readToEnd(t, c, 3*time.Second); len(e.kicks) != 0 || len(e.others) != 0 {
					t.Errorf("after refusal: kicks %q, packets %v", e.kicks, e.others)
				}
				// The right token gets in.
				ok := dial(t, tr.addr(n), client.WithUser(userToken{"ok"}))
				var resp Resp
				if err := request(t, ok, "game.echo", &Req{Msg: "in"}, &resp); err != nil || resp.Msg != "in" {
					t.Fatalf("echo = %+v, %v", resp, err)
				}
			})
		})
	}
	select {
	case m := <-g.notes:
		t.Errorf("a notify sent before the handshake completed ran its handler: %q", m)
	default:
	}
}

// ---------------------------------------------------------------------------
// 6. Malformed and oversized input

func TestBadPackets(t *testing.T) {
	g := newGame()
	n := startTestNode(t,
		node.WithComponent(g, gameOpts...),
		node.WithAgent(agent.WithMaxPacket(1024)))
	for _, tr := range transports {
		t.Run(tr.name, func(t *testing.T) {
			t.Run("oversized-header", func(t *testing.T) {
				t.Parallel()
				c := dialRaw(t, tr.addr(n))
				handshake(t, c)
				// Only the header, declaring 2048 bytes: the server must
				// refuse on the header alone, without waiting for the body.
				if err := c.WriteRaw([]byte{byte(packet.Data), 0x00, 0x08, 0x00}); err != nil {
					t.Fatal(err)
				}
				expectKick(t, c, "packet too large", 3*time.Second)
			})
			t.Run("oversized-before-handshake", func(t *testing.T) {
				t.Parallel()
				c := dialRaw(t, tr.addr(n))
				if err := c.WriteRaw([]byte{byte(packet.Handshake), 0xff, 0xff, 0xff}); err != nil {
					t.Fatal(err)
				}
				expectKick(t, c, "packet too large", 3*time.Second)
			})
			t.Run("zlib", func(t *testing.T) {
				t.Parallel()
				c := dialRaw(t, tr.addr(n))
				handshake(t, c)
				// A small zlib payload within the limit is accepted...
				msg := "zipped-" + tr.name
				small := []byte{byte(message.Notify)<<1 | message.FlagZlib, byte(len("game.note"))}
				small = append(small, "game.note"...)
				small = append(small, zlibBytes(t, []byte(`{"msg":"`+msg+`"}`))...)
				p, _ := packet.Encode(packet.Data, small)
				if err := c.WriteRaw(p); err != nil {
					t.Fatal(err)
				}
				eventually(t, 5*time.Second, "the zlib notify to run", func() bool {
					select {
					case m := <-g.notes:
						if m == msg {
							return true
						}
						g.notes <- m // another subtest's
					default:
					}
					return false
				})
				// ... a bomb that inflates past the limit is not.
				bomb := []byte{byte(message.Notify)<<1 | message.FlagZlib, byte(len("game.note"))}
				bomb = append(bomb, "game.note"...)
				bomb = append(bomb, zlibBytes(t, make([]byte, 100_000))...)
				if len(bomb) > 1024 {
					t.Fatalf("bomb is %d bytes, must fit in a packet", len(bomb))
				}
				p, _ = packet.Encode(packet.Data, bomb)
				if err := c.WriteRaw(p); err != nil {
					t.Fatal(err)
				}
				expectKick(t, c, "packet too large", 3*time.Second)
			})
			t.Run("unknown-type", func(t *testing.T) {
				t.Parallel()
				c := dialRaw(t, tr.addr(n))
				handshake(t, c)
				if err := c.WriteRaw([]byte{0x09, 0x00, 0x00, 0x02, 0xde, 0xad}); err != nil {
					t.Fatal(err)
				}
				expectKick(t, c, "malformed packet", 3*time.Second)
			})
			t.Run("bad-message", func(t *testing.T) {
				t.Parallel()
				c := dialRaw(t, tr.addr(n))
				handshake(t, c)
				// A Response from the client is not acceptable.
				if err := c.WriteRaw(dataPacket(t, &message.Message{Type: message.Response, ID: 1, Data: []byte("{}")}, nil)); err != nil {
					t.Fatal(err)
				}
				expectKick(t, c, "malformed packet", 3*time.Second)
			})
		})
	}
	t.Run("ws-text-frame", func(t *testing.T) {
		t.Parallel()
		out := wsTextFrame(t, n.WSAddr(), "/nano", []byte("hello"))
		if !bytes.Contains(out, []byte(`"reason":"malformed packet"`)) {
			t.Errorf("server sent %q before closing, want a malformed-packet kick", out)
		}
	})
}

// wsTextFrame upgrades a connection by hand, sends one masked text frame and
// returns everything the server sent after the upgrade until it closed the
// connection.
func wsTextFrame(t *testing.T, addr, path string, payload []byte) []byte {
	t.Helper()
	nc, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	_ = nc.SetDeadline(time.Now().Add(5 * time.Second))
	key := make([]byte, 16)
	_, _ = rand.Read(key)
	fmt.Fprintf(nc, "GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
		"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n", path, addr, base64.StdEncoding.EncodeToString(key))
	br := bufio.NewReader(nc)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("upgrade: %s", resp.Status)
	}
	mask := [4]byte{1, 2, 3, 4}
	frame := []byte{0x81, 0x80 | byte(len(payload))}
	frame = append(frame, mask[:]...)
	for i, b := range payload {
		frame = append(frame, b^mask[i%4])
	}
	if _, err := nc.Write(frame); err != nil {
		t.Fatal(err)
	}
	out, err := io.ReadAll(br)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("connection still open 5 s after a text frame (got %q)", out)
	}
	return out
}

// ---------------------------------------------------------------------------
// 7. Slow consumer

func TestSlowConsumer(t *testing.T) {
	g := newGame()
	n := startTestNode(t,
		node.WithComponent(g, gameOpts...),
		node.WithAgent(agent.WithWriteBacklog(64<<10)))
	for _, tr := range transports {
		t.Run(tr.name, func(t *testing.T) {
			healthy := dial(t, tr.addr(n))
			slow := dialRaw(t, tr.addr(n))
			handshake(t, slow)
			// ~10 MB of pushes to a client that does not read.
			if err := slow.WriteRaw(dataPacket(t, &message.Message{Type: message.Request, ID: 1, Route: "game.flood",
				Data: []byte(`{"n":160,"size":65536}`)}, nil)); err != nil {
				t.Fatal(err)
			}
			sid := recv(t, g.entered, 5*time.Second, "the flood handler")
			if err := recv(t, g.floodErr, 10*time.Second, "the flood to end"); err == nil {
				t.Fatal("10 MB pushed to a client that does not read: the backlog is unbounded")
			}
			eventually(t, 5*time.Second, "the slow session to be removed", func() bool {
				_, ok := n.Agent().Session(sid)
				return !ok
			})
			// The connection ends (after whatever the kernel buffered).
			readToEnd(t, slow, 10*time.Second)
			// The server is healthy for the others.
			var resp Resp
			if err := request(t, healthy, "game.echo", &Req{Msg: "fine"}, &resp); err != nil || resp.Msg != "fine" {
				t.Fatalf("healthy client: %+v, %v", resp, err)
			}
			fresh := dial(t, tr.addr(n))
			if err := request(t, fresh, "game.echo", &Req{Msg: "new"}, &resp); err != nil || resp.Msg != "new" {
				t.Fatalf("new client: %+v, %v", resp, err)
			}
			healthy.Close()
			fresh.Close()
			eventually(t, 5*time.Second, "all sessions to end", func() bool { return n.Agent().Sessions() == 0 })
		})
	}
}

// ---------------------------------------------------------------------------
// 8. Flooding

func TestFloodingKicked(t *testing.T) {
	g := newGame()
	n := startTestNode(t,
		node.WithComponent(g, gameOpts...),
		node.WithDispatcher(handler.WithMaxPending(4)))
	t.Cleanup(func() { close(g.release) })
	// 50 notifies in one write, to a handler that blocks: the client cannot
	// have seen the kick before it sent them all, and never writes after.
	var flood []byte
	for range 50 {
		flood = append(flood, dataPacket(t, &message.Message{Type: message.Notify, Route: "game.block"}, nil)...)
	}
	for _, tr := range transports {
		t.Run(tr.name, func(t *testing.T) {
			c := dialRaw(t, tr.addr(n))
			handshake(t, c)
			eventually(t, 5*time.Second, "the session", func() bool { return n.Agent().Sessions() == 1 })
			if err := c.WriteRaw(flood); err != nil {
				t.Fatal(err)
			}
			recv(t, g.entered, 5*time.Second, "the blocking handler")
			expectKick(t, c, "too many pending messages", 5*time.Second)
			eventually(t, 5*time.Second, "the session to be removed", func() bool { return n.Agent().Sessions() == 0 })
		})
	}
}

// ---------------------------------------------------------------------------
// 9. Graceful shutdown

type eventLog struct {
	mu  sync.Mutex
	evs []string
}

func (l *eventLog) add(e string) {
	l.mu.Lock()
	l.evs = append(l.evs, e)
	l.mu.Unlock()
}

func (l *eventLog) get() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.evs...)
}

// Life records its lifecycle hooks.
type Life struct {
	name     string
	log      *eventLog
	onBefore chan struct{} // closed by BeforeShutdown, if set
}

func (l *Life) Init()      { l.log.add(l.name + ".Init") }
func (l *Life) AfterInit() { l.log.add(l.name + ".AfterInit") }
func (l *Life) BeforeShutdown() {
	l.log.add(l.name + ".BeforeShutdown")
	if l.onBefore != nil {
		close(l.onBefore)
	}
}
func (l *Life) Shutdown()                               { l.log.add(l.name + ".Shutdown") }
func (l *Life) Ping(s *session.Session, _ []byte) error { return s.Response("pong") }

func TestGracefulShutdown(t *testing.T) {
	log := &eventLog{}
	g := newGame()
	g.events = log
	before := make(chan struct{})
	n := node.New(
		node.WithTCPAddr("127.0.0.1:0"),
		node.WithWSAddr("127.0.0.1:0"),
		node.WithComponent(&Life{name: "a", log: log, onBefore: before}, handler.WithName("a")),
		node.WithComponent(g, gameOpts...),
		node.WithComponent(&Life{name: "b", log: log}, handler.WithName("b")),
	)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if err := n.Start(ctx); err != nil {
		t.Fatal(err)
	}
	released := false
	defer func() {
		if !released {
			close(g.release)
		}
		_ = n.Shutdown(ctx)
	}()
	if got, want := strings.Join(log.get(), " "), "a.Init b.Init a.AfterInit b.AfterInit"; got != want {
		t.Errorf("start hooks: %s, want %s", got, want)
	}
	tcpAddr, wsAddr := "tcp://"+n.TCPAddr(), "ws://"+n.WSAddr()+"/nano"
	c1 := dial(t, tcpAddr)
	c2 := dial(t, wsAddr)
	raws := []*client.Conn{dialRaw(t, tcpAddr), dialRaw(t, wsAddr)}
	for _, r := range raws {
		handshake(t, r)
	}
	idle := dialRaw(t, tcpAddr) // never handshakes
	eventually(t, 5*time.Second, "5 connections", func() bool { return n.Agent().Count() == 5 })

	// A request in flight in a slow handler.
	slowDone := make(chan error, 1)
	var slowResp Resp
	go func() { slowDone <- c1.Request(ctx, "game.slow", &Req{Msg: "finished"}, &slowResp) }()
	recv(t, g.entered, 5*time.Second, "the slow handler")

	shutDone := make(chan error, 1)
	go func() { shutDone <- n.Shutdown(ctx) }()
	recv(t, before, 5*time.Second, "BeforeShutdown")

	// New connections are refused once Shutdown has begun.
	for _, addr := range []string{tcpAddr, wsAddr} {
		dctx, dcancel := context.WithTimeout(ctx, 3*time.Second)
		c, err := client.Dial(dctx, addr)
		dcancel()
		if err == nil {
			c.Close()
			t.Errorf("%s: new client accepted during shutdown", addr)
		}
	}
	// New requests get 503 once the node drains.
	eventually(t, 5*time.Second, "a 503 for a new request", func() bool {
		err := request(t, c2, "game.echo", &Req{Msg: "late"}, nil)
		if err == nil {
			return false // not draining yet
		}
		var ce *client.Error
		if !errors.As(err, &ce) || ce.Code != 503 {
			t.Fatalf("request during shutdown: %v, want a 503", err)
		}
		return true
	})
	select {
	case err := <-shutDone:
		t.Fatalf("Shutdown returned %v with a request in flight", err)
	default:
	}

	// The in-flight request completes, then everyone is kicked.
	close(g.release)
	released = true
	if err := recv(t, slowDone, 5*time.Second, "the slow response"); err != nil || slowResp.Msg != "finished" {
		t.Fatalf("in-flight request: %+v, %v", slowResp, err)
	}
	for i, c := range []*client.Client{c1, c2} {
		if r := kickReason(t, c, 5*time.Second); r != "shutdown" {
			t.Errorf("client %d kicked with %q", i, r)
		}
	}
	for i, r := range append(raws, idle) {
		e := expectKick(t, r, "shutdown", 5*time.Second)
		if string(e.kickBody) != `{"reason":"shutdown"}` {
			t.Errorf("raw %d: kick body %s", i, e.kickBody)
		}
	}
	if err := recv(t, shutDone, 10*time.Second, "Shutdown to return"); err != nil {
		t.Errorf("Shutdown: %v", err)
	}
	if n.Agent().Count() != 0 || n.Agent().Sessions() != 0 {
		t.Errorf("after shutdown: %d connections, %d sessions", n.Agent().Count(), n.Agent().Sessions())
	}
	want := "a.Init b.Init a.AfterInit b.AfterInit b.BeforeShutdown a.BeforeShutdown slow.done b.Shutdown a.Shutdown"
	if got := strings.Join(log.get(), " "); got != want {
		t.Errorf("hooks:\n got %s\nwant %s", got, want)
	}
}

// ---------------------------------------------------------------------------
// 10. Concurrency

// Order records the order in which each session's messages are handled.
type Order struct {
	handler.Base
	mu         sync.Mutex
	last       map[int64]int
	violations []string

	meetMu  sync.Mutex
	arrived int
	met     chan struct{}
}

func (o *Order) Seq(s *session.Session, r *Req) error {
	o.mu.Lock()
	if want := o.last[s.ID()] + 1; r.Seq != want {
		o.violations = append(o.violations, fmt.Sprintf("session %d: got seq %d, want %d", s.ID(), r.Seq, want))
	}
	o.last[s.ID()] = r.Seq
	o.mu.Unlock()
	if s.LastMID() != 0 { // a request
		return s.Response(&Resp{Seq: r.Seq})
	}
	return nil
}

// Meet returns once two sessions are in it at the same time.
func (o *Order) Meet(s *session.Session, _ []byte) error {
	o.meetMu.Lock()
	o.arrived++
	if o.arrived == 2 {
		close(o.met)
	}
	o.meetMu.Unlock()
	select {
	case <-o.met:
		return s.Response("met")
	case <-time.After(5 * time.Second):
		return errors.New("the other session never arrived: sessions do not run in parallel")
	}
}

func TestConcurrentSessions(t *testing.T) {
	o := &Order{last: make(map[int64]int), met: make(chan struct{})}
	n := startTestNode(t, node.WithComponent(o, handler.WithName("order"), handler.WithNameFunc(handler.LowerFirst)))
	const clients, msgs = 50, 100
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	for i := range clients {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			c, err := client.Dial(ctx, transports[i%2].addr(n))
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			for seq := 1; seq <= msgs; seq++ {
				if seq%10 == 0 {
					var resp Resp
					if err := c.Request(ctx, "order.seq", &Req{Seq: seq}, &resp); err != nil {
						errs <- err
						return
					}
					if resp.Seq != seq {
						errs <- fmt.Errorf("client %d: response seq %d to request %d", i, resp.Seq, seq)
						return
					}
				} else if err := c.Notify(ctx, "order.seq", &Req{Seq: seq}); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	o.mu.Lock()
	if len(o.violations) > 0 {
		t.Errorf("%d order violations, first: %s", len(o.violations), o.violations[0])
	}
	if len(o.last) != clients {
		t.Errorf("%d sessions seen, want %d", len(o.last), clients)
	}
	for sid, last := range o.last {
		if last != msgs {
			t.Errorf("session %d: last seq %d, want %d", sid, last, msgs)
		}
	}
	o.mu.Unlock()

	// Two sessions in one handler at once: would deadlock if serial.
	a, b := dial(t, transports[0].addr(n)), dial(t, transports[1].addr(n))
	res := make(chan error, 2)
	for _, c := range []*client.Client{a, b} {
		go func() { res <- request(t, c, "order.meet", nil, nil) }()
	}
	for range 2 {
		if err := recv(t, res, 10*time.Second, "meet"); err != nil {
			t.Error(err)
		}
	}
}

// Serial checks that its handlers never run concurrently.
type Serial struct {
	handler.Base
	active, peak, calls *atomic.Int64
}

func (c *Serial) Work(s *session.Session, r *Req) error {
	n := c.active.Add(1)
	for {
		p := c.peak.Load()
		if n <= p || c.peak.CompareAndSwap(p, n) {
			break
		}
	}
	for range 20 {
		runtime.Gosched() // give another handler a chance to overlap
	}
	c.calls.Add(1)
	c.active.Add(-1)
	return s.Response(&Resp{Seq: r.Seq})
}

func TestSerialExecutor(t *testing.T) {
	var active, peak, calls atomic.Int64
	n := startTestNode(t,
		node.WithComponent(&Serial{active: &active, peak: &peak, calls: &calls},
			handler.WithName("s1"), handler.WithNameFunc(handler.LowerFirst), handler.WithSerial("game")),
		node.WithComponent(&Serial{active: &active, peak: &peak, calls: &calls},
			handler.WithName("s2"), handler.WithNameFunc(handler.LowerFirst), handler.WithSerial("game")))
	if _, ok := n.Dispatcher().Executor("game"); !ok {
		t.Fatal("no executor named game")
	}
	const clients, reqs = 20, 50
	var wg sync.WaitGroup
	errs := make(chan error, clients*reqs)
	for i := range clients {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			c, err := client.Dial(ctx, transports[i%2].addr(n))
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			// Several requests in flight per client, on both components.
			var cw sync.WaitGroup
			for j := range reqs {
				cw.Go(func() {
					route := []string{"s1.work", "s2.work"}[j%2]
					if err := c.Request(ctx, route, &Req{Seq: j}, nil); err != nil {
						errs <- err
					}
				})
			}
			cw.Wait()
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if calls.Load() != clients*reqs {
		t.Errorf("%d calls, want %d", calls.Load(), clients*reqs)
	}
	if p := peak.Load(); p != 1 {
		t.Errorf("up to %d handlers of the serial executor ran at once, want 1", p)
	}
}
