package client

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"math/big"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/encoding/protowire"

	"github.com/nanomesh/nanomesh/message"
	"github.com/nanomesh/nanomesh/packet"
)

// both runs fn over TCP and over WebSocket.
func both(t *testing.T, o srvOpts, fn func(t *testing.T, s *testServer)) {
	for _, ws := range []bool{false, true} {
		name := "tcp"
		if ws {
			name = "ws"
		}
		t.Run(name, func(t *testing.T) {
			o := o
			o.ws = ws
			fn(t, newServer(t, o))
		})
	}
}

func dial(t *testing.T, s *testServer, opts ...Option) *Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Dial(ctx, s.addr, opts...)
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	t.Cleanup(func() {
		c.Close()
		<-c.Done()
	})
	return c
}

func ctx5(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func waitDone(t *testing.T, c *Client) {
	t.Helper()
	select {
	case <-c.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("client not done")
	}
}

var testDict = map[string]uint16{"x.echo": 1, "onPush": 2, "x.notify": 3}

func TestDialHandshake(t *testing.T) {
	both(t, srvOpts{heartbeat: 30, dict: testDict}, func(t *testing.T, s *testServer) {
		c := dial(t, s, WithUser(map[string]any{"name": "bob"}))
		info := c.Handshake()
		if info.Code != 200 || info.Heartbeat != 30*time.Second || info.Serializer != "json" {
			t.Fatalf("handshake info %+v", info)
		}
		if !maps.Equal(info.Dict, testDict) {
			t.Fatalf("dict %v, want %v", info.Dict, testDict)
		}
		if d := time.Since(info.ServerTime); d < -2*time.Second || d > 5*time.Second {
			t.Fatalf("server time %v", info.ServerTime)
		}
		var raw map[string]any
		if err := json.Unmarshal(info.Raw, &raw); err != nil || raw["code"] != 200.0 {
			t.Fatalf("raw %s: %v", info.Raw, err)
		}
		if c.Serializer() != message.JSON {
			t.Fatalf("serializer %s", c.Serializer().Name())
		}
		hs := s.expect("handshake", 5*time.Second).hs
		sys, _ := hs["sys"].(map[string]any)
		user, _ := hs["user"].(map[string]any)
		if sys["type"] != "go" || sys["version"] != "nanomesh" || user["name"] != "bob" {
			t.Fatalf("client handshake %v", hs)
		}
		s.expect("ack", 5*time.Second)
		if c.Err() != nil {
			t.Fatalf("Err() = %v on a live client", c.Err())
		}
	})
}

func TestDialNoUserNoDict(t *testing.T) {
	s := newServer(t, srvOpts{serializer: "protobuf"})
	c := dial(t, s)
	if hs := s.expect("handshake", 5*time.Second).hs; hs["user"] != nil {
		t.Fatalf("user sent: %v", hs)
	}
	if info := c.Handshake(); info.Dict != nil || info.Heartbeat != 0 || info.Serializer != "protobuf" {
		t.Fatalf("info %+v", info)
	}
	if c.Serializer() != message.Protobuf {
		t.Fatalf("serializer %s, want the announced protobuf", c.Serializer().Name())
	}
	var raw []byte
	if err := c.Request(ctx5(t), "x.echo", []byte{1, 2}, &raw); err != nil || !bytes.Equal(raw, []byte{1, 2}) {
		t.Fatalf("raw echo %v %v", raw, err)
	}
}

func TestDialRejected(t *testing.T) {
	both(t, srvOpts{}, func(t *testing.T, s *testServer) {
		_, err := Dial(ctx5(t), s.addr, WithUser(map[string]any{"reject": true}))
		var e *Error
		if !errors.As(err, &e) || e.Code != 403 || e.Message != "go away" {
			t.Fatalf("err = %v, want *Error 403", err)
		}
	})
}

func TestDialKickedDuringHandshake(t *testing.T) {
	s := newServer(t, srvOpts{})
	_, err := Dial(ctx5(t), s.addr, WithUser(map[string]any{"kick": true}))
	if !errors.Is(err, ErrKicked) || !strings.Contains(err.Error(), "not welcome") {
		t.Fatalf("err = %v, want ErrKicked", err)
	}
}

func TestDialContextTimeout(t *testing.T) {
	both(t, srvOpts{}, func(t *testing.T, s *testServer) {
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel()
		start := time.Now()
		_, err := Dial(ctx, s.addr, WithUser(map[string]any{"silent": true}))
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("err = %v, want DeadlineExceeded", err)
		}
		if d := time.Since(start); d > 2*time.Second {
			t.Fatalf("Dial took %v", d)
		}
	})
}

func TestDialBadAddress(t *testing.T) {
	for _, addr := range []string{"http://127.0.0.1:1", "ws://", "tcp://127.0.0.1:1"} {
		if _, err := Dial(ctx5(t), addr); err == nil {
			t.Errorf("Dial(%q) succeeded", addr)
		}
	}
}

func TestWSUpgradeErrors(t *testing.T) {
	s := newServer(t, srvOpts{ws: true, badAccept: true})
	if _, err := DialRaw(ctx5(t), s.addr); !errors.Is(err, ErrProtocol) || !strings.Contains(err.Error(), "Accept") {
		t.Fatalf("bad accept: err = %v", err)
	}
	s = newServer(t, srvOpts{ws: true})
	_, err := DialRaw(ctx5(t), s.addr, WithHeader(http.Header{"X-Test": {"forbidden"}}))
	if err == nil || !strings.Contains(err.Error(), "403") || !strings.Contains(err.Error(), "forbidden") {
		t.Fatalf("forbidden: err = %v", err)
	}
}

type payload struct {
	Name string `json:"name"`
	N    int    `json:"n"`
}

func TestRequestEcho(t *testing.T) {
	both(t, srvOpts{}, func(t *testing.T, s *testServer) {
		c := dial(t, s)
		ctx := ctx5(t)
		var out payload
		if err := c.Request(ctx, "x.echo", payload{"a", 1}, &out); err != nil || out != (payload{"a", 1}) {
			t.Fatalf("echo: %+v %v", out, err)
		}
		if err := c.Request(ctx, "x.echo", payload{"b", 2}, nil); err != nil {
			t.Fatalf("nil resp: %v", err)
		}
		// Raw payloads of several sizes: 7-bit, 16-bit and 64-bit WS lengths.
		for _, n := range []int{0, 100, 200, 70000} {
			in := bytes.Repeat([]byte{'x'}, n)
			var raw []byte
			if err := c.Request(ctx, "x.echo", in, &raw); err != nil || !bytes.Equal(raw, in) {
				t.Fatalf("raw echo of %d bytes: got %d bytes, %v", n, len(raw), err)
			}
		}
		var ids []uint64
		for len(ids) < 6 {
			if e := s.expect("msg", 5*time.Second); e.msg.Type == message.Request {
				ids = append(ids, e.msg.ID)
			}
		}
		for i, id := range ids {
			if id != uint64(i+1) {
				t.Fatalf("request ids %v, want 1, 2, ...", ids)
			}
		}
	})
}

func TestConcurrentRequests(t *testing.T) {
	both(t, srvOpts{}, func(t *testing.T, s *testServer) {
		c := dial(t, s)
		ctx := ctx5(t)
		var wg sync.WaitGroup
		errs := make(chan error, 20)
		for g := range 20 {
			wg.Go(func() {
				for i := range 25 {
					in := payload{fmt.Sprint(g), i}
					var out payload
					if err := c.Request(ctx, "x.echo", in, &out); err != nil || out != in {
						errs <- fmt.Errorf("goroutine %d: %+v %v", g, out, err)
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
	})
}

func TestRouteCompression(t *testing.T) {
	both(t, srvOpts{dict: testDict}, func(t *testing.T, s *testServer) {
		ctx := ctx5(t)
		check := func(route string, compressed bool) {
			t.Helper()
			e := s.expect("msg", 5*time.Second)
			if e.msg.Route != route || (e.flag&message.FlagRouteCompressed != 0) != compressed {
				t.Fatalf("server got route %q flag 0x%02x, want %q compressed=%v", e.msg.Route, e.flag, route, compressed)
			}
		}
		c := dial(t, s)
		pushes := c.Pushes("onPush", 1)
		if err := c.Request(ctx, "x.echo", "a", nil); err != nil {
			t.Fatal(err)
		}
		check("x.echo", true)
		if err := c.Request(ctx, "x.fail", nil, nil); err == nil {
			t.Fatal("x.fail succeeded")
		}
		check("x.fail", false)
		// Notify with a compressed route; the push comes back compressed too.
		if err := c.Notify(ctx, "x.notify", "hello"); err != nil {
			t.Fatal(err)
		}
		check("x.notify", true)
		if p := <-pushes; string(p) != `"hello"` {
			t.Fatalf("push %q", p)
		}

		off := dial(t, s, WithRouteCompression(false))
		if err := off.Request(ctx, "x.echo", "a", nil); err != nil {
			t.Fatal(err)
		}
		check("x.echo", false)
		if err := off.Notify(ctx, "x.notify", "b"); err != nil {
			t.Fatal(err)
		}
		check("x.notify", false)
	})
}

func TestResponsesOutOfOrder(t *testing.T) {
	both(t, srvOpts{reverseN: 5}, func(t *testing.T, s *testServer) {
		c := dial(t, s)
		ctx := ctx5(t)
		var wg sync.WaitGroup
		got := make([]int, 5)
		errs := make([]error, 5)
		for i := range 5 {
			wg.Go(func() { errs[i] = c.Request(ctx, "x.reverse", i*10, &got[i]) })
		}
		wg.Wait()
		for i := range 5 {
			if errs[i] != nil || got[i] != i*10 {
				t.Fatalf("request %d: got %d, %v", i, got[i], errs[i])
			}
		}
		seen := map[uint64]bool{}
		for range 5 {
			seen[s.expect("msg", 5*time.Second).msg.ID] = true
		}
		if len(seen) != 5 {
			t.Fatalf("ids %v not distinct", seen)
		}
	})
}

func TestErrorResponse(t *testing.T) {
	both(t, srvOpts{}, func(t *testing.T, s *testServer) {
		c := dial(t, s)
		var e *Error
		err := c.Request(ctx5(t), "x.fail", nil, nil)
		if !errors.As(err, &e) || e.Code != 418 || e.Message != "teapot" {
			t.Fatalf("err = %v, want *Error 418 teapot", err)
		}
		err = c.Request(ctx5(t), "no.such", nil, nil)
		if !errors.As(err, &e) || e.Code != 404 {
			t.Fatalf("err = %v, want *Error 404", err)
		}
		if c.Err() != nil {
			t.Fatalf("error response ended the client: %v", c.Err())
		}
	})
}

func TestDecodeError(t *testing.T) {
	pb := protowire.AppendTag(nil, 1, protowire.VarintType)
	pb = protowire.AppendVarint(pb, 404)
	pb = protowire.AppendTag(pb, 2, protowire.BytesType)
	pb = protowire.AppendString(pb, "not found")
	pitaya := protowire.AppendTag(nil, 1, protowire.BytesType)
	pitaya = protowire.AppendString(pitaya, "500")
	pitaya = protowire.AppendTag(pitaya, 2, protowire.BytesType)
	pitaya = protowire.AppendString(pitaya, "boom")
	for _, tc := range []struct {
		in   []byte
		want Error
	}{
		{[]byte(`{"code":504,"message":"timeout"}`), Error{504, "timeout"}},
		{pb, Error{404, "not found"}},
		{pitaya, Error{500, "boom"}},
		{[]byte("\xff\xff garbage"), Error{0, "\xff\xff garbage"}},
	} {
		if got := decodeError(tc.in); *got != tc.want {
			t.Errorf("decodeError(%q) = %+v, want %+v", tc.in, *got, tc.want)
		}
	}
	if s := (&Error{Code: 500, Message: "x"}).Error(); !strings.Contains(s, "500") || !strings.Contains(s, "x") {
		t.Errorf("Error() = %q", s)
	}
}

func TestRequestContext(t *testing.T) {
	both(t, srvOpts{}, func(t *testing.T, s *testServer) {
		c := dial(t, s)
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		defer cancel()
		if err := c.Request(ctx, "x.silent", nil, nil); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("err = %v, want DeadlineExceeded", err)
		}
		ctx, cancel = context.WithCancel(context.Background())
		time.AfterFunc(20*time.Millisecond, cancel)
		if err := c.Request(ctx, "x.silent", nil, nil); !errors.Is(err, context.Canceled) {
			t.Fatalf("err = %v, want Canceled", err)
		}
		// A done context fails before anything is sent; the client lives on.
		if err := c.Notify(ctx, "x.notify", 1); !errors.Is(err, context.Canceled) {
			t.Fatalf("notify err = %v, want Canceled", err)
		}
		var n int
		if err := c.Request(ctx5(t), "x.echo", 7, &n); err != nil || n != 7 {
			t.Fatalf("echo after timeouts: %d %v", n, err)
		}
	})
}

func TestNotifyPush(t *testing.T) {
	both(t, srvOpts{}, func(t *testing.T, s *testServer) {
		c := dial(t, s)
		var mu sync.Mutex
		var got []string
		c.On("onPush", func(data []byte) {
			mu.Lock()
			got = append(got, string(data))
			mu.Unlock()
		})
		ch := c.Pushes("onPush", 10)
		other := c.Pushes("other", 1)
		for i := range 3 {
			route := "x.notify"
			if i == 2 {
				route = "x.zpush" // the push comes back zlib-compressed
			}
			if err := c.Notify(ctx5(t), route, i); err != nil {
				t.Fatal(err)
			}
		}
		for i := range 3 {
			select {
			case p := <-ch:
				if string(p) != fmt.Sprint(i) {
					t.Fatalf("push %d = %q", i, p)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("no push")
			}
		}
		mu.Lock()
		if strings.Join(got, ",") != "0,1,2" {
			t.Fatalf("On handler got %q", got)
		}
		mu.Unlock()
		select {
		case p := <-other:
			t.Fatalf("push %q on the wrong route", p)
		default:
		}
		c.Close()
		waitDone(t, c)
		if _, ok := <-ch; ok {
			t.Fatal("Pushes channel not closed after Close")
		}
	})
}

func TestKick(t *testing.T) {
	both(t, srvOpts{}, func(t *testing.T, s *testServer) {
		c := dial(t, s)
		pushes := c.Pushes("onPush", 1)
		pending := make(chan error, 1)
		go func() { pending <- c.Request(ctx5(t), "x.silent", nil, nil) }()
		s.expect("msg", 5*time.Second) // the silent request has been sent
		if _, ok := c.Kicked(); ok {
			t.Fatal("Kicked before the kick")
		}
		err := c.Request(ctx5(t), "x.kick", nil, nil)
		if !errors.Is(err, ErrKicked) || !errors.Is(err, ErrClosed) || !strings.Contains(err.Error(), "bye") {
			t.Fatalf("kick request err = %v", err)
		}
		if err := <-pending; !errors.Is(err, ErrKicked) {
			t.Fatalf("pending request err = %v, want ErrKicked", err)
		}
		waitDone(t, c)
		if reason, ok := c.Kicked(); !ok || reason != "bye" {
			t.Fatalf("Kicked() = %q, %v", reason, ok)
		}
		if err := c.Err(); !errors.Is(err, ErrKicked) || !errors.Is(err, ErrClosed) {
			t.Fatalf("Err() = %v", err)
		}
		if err := c.Request(ctx5(t), "x.echo", 1, nil); !errors.Is(err, ErrKicked) {
			t.Fatalf("request after kick: %v", err)
		}
		if err := c.Notify(ctx5(t), "x.notify", 1); !errors.Is(err, ErrClosed) {
			t.Fatalf("notify after kick: %v", err)
		}
		if _, ok := <-pushes; ok {
			t.Fatal("Pushes channel open after kick")
		}
	})
}

func TestServerCloses(t *testing.T) {
	both(t, srvOpts{}, func(t *testing.T, s *testServer) {
		c := dial(t, s)
		err := c.Request(ctx5(t), "x.close", nil, nil)
		if !errors.Is(err, ErrClosed) {
			t.Fatalf("err = %v, want ErrClosed", err)
		}
		waitDone(t, c)
		if _, ok := c.Kicked(); ok {
			t.Fatal("Kicked() after a plain close")
		}
		if s.o.ws {
			var ce *CloseError
			if !errors.As(c.Err(), &ce) || ce.Code != 4000 || ce.Reason != "going away" {
				t.Fatalf("Err() = %v, want CloseError 4000", c.Err())
			}
			if e := s.expect("close", 5*time.Second); e.flag != 2 {
				t.Fatalf("client's close reply carried %d bytes, want the status code", e.flag)
			}
		} else if !errors.Is(c.Err(), io.EOF) {
			t.Fatalf("Err() = %v, want EOF", c.Err())
		}
	})
}

func TestClientClose(t *testing.T) {
	both(t, srvOpts{}, func(t *testing.T, s *testServer) {
		c := dial(t, s)
		pending := make(chan error, 1)
		go func() { pending <- c.Request(ctx5(t), "x.silent", nil, nil) }()
		s.expect("msg", 5*time.Second)
		if err := c.Close(); err != nil {
			t.Fatal(err)
		}
		if err := c.Close(); err != nil {
			t.Fatal(err)
		}
		waitDone(t, c)
		if err := <-pending; !errors.Is(err, ErrClosed) {
			t.Fatalf("pending request: %v", err)
		}
		if c.Err() != ErrClosed {
			t.Fatalf("Err() = %v, want ErrClosed", c.Err())
		}
		if err := c.Request(ctx5(t), "x.echo", 1, nil); !errors.Is(err, ErrClosed) {
			t.Fatalf("request after Close: %v", err)
		}
		if s.o.ws {
			s.expect("close", 5*time.Second)
		}
	})
}

func TestHeartbeat(t *testing.T) {
	t.Run("enabled", func(t *testing.T) {
		t.Parallel()
		s := newServer(t, srvOpts{heartbeat: 1})
		dial(t, s)
		s.expect("heartbeat", 3*time.Second)
		s.expect("heartbeat", 3*time.Second)
	})
	t.Run("disabled", func(t *testing.T) {
		t.Parallel()
		s := newServer(t, srvOpts{heartbeat: 1, ws: true})
		dial(t, s, WithHeartbeat(false))
		s.none("heartbeat", 1600*time.Millisecond)
	})
}

// TestFragmentedFrames has the server split everything it sends, the
// handshake reply included, into 3-byte pieces: WebSocket continuation frames
// with a ping after each, or 3-byte TCP writes.
func TestFragmentedFrames(t *testing.T) {
	both(t, srvOpts{frag: 3, dict: testDict, heartbeat: 10}, func(t *testing.T, s *testServer) {
		c := dial(t, s)
		if !maps.Equal(c.Handshake().Dict, testDict) {
			t.Fatalf("dict %v", c.Handshake().Dict)
		}
		var out payload
		in := payload{strings.Repeat("z", 50), 3}
		if err := c.Request(ctx5(t), "x.echo", in, &out); err != nil || out != in {
			t.Fatalf("echo %+v %v", out, err)
		}
		ch := c.Pushes("onPush", 1)
		if err := c.Notify(ctx5(t), "x.notify", "p"); err != nil {
			t.Fatal(err)
		}
		if p := <-ch; string(p) != `"p"` {
			t.Fatalf("push %q", p)
		}
		if s.o.ws {
			s.expect("pong", 5*time.Second) // the client answered the interleaved pings
		}
	})
}

// TestMultiplePacketsPerFrame has the server send two pushes and a response
// in two frames (or writes) cut in the middle of the second push.
func TestMultiplePacketsPerFrame(t *testing.T) {
	both(t, srvOpts{}, func(t *testing.T, s *testServer) {
		c := dial(t, s)
		ch := c.Pushes("onPush", 2)
		var out string
		if err := c.Request(ctx5(t), "x.multi", "r", &out); err != nil || out != "r" {
			t.Fatalf("response %q %v", out, err)
		}
		// Pushes are dispatched in arrival order, before the response.
		for _, want := range []string{`"1"`, `"2"`} {
			select {
			case p := <-ch:
				if string(p) != want {
					t.Fatalf("push %q, want %s", p, want)
				}
			default:
				t.Fatalf("push %s not delivered before the response", want)
			}
		}
	})
}

func TestMaxPacket(t *testing.T) {
	both(t, srvOpts{}, func(t *testing.T, s *testServer) {
		c := dial(t, s, WithMaxPacket(200))
		err := c.Request(ctx5(t), "x.echo", bytes.Repeat([]byte{'a'}, 300), nil)
		if !errors.Is(err, ErrClosed) {
			t.Fatalf("err = %v, want ErrClosed", err)
		}
		waitDone(t, c)
		if !errors.Is(c.Err(), ErrProtocol) || !errors.Is(c.Err(), packet.ErrTooLarge) {
			t.Fatalf("Err() = %v, want ErrProtocol and packet.ErrTooLarge", c.Err())
		}
	})
}

func TestLocalAddr(t *testing.T) {
	s := newServer(t, srvOpts{})
	src := &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}
	c := dial(t, s, WithLocalAddr(src), WithDialer(&net.Dialer{Timeout: time.Second}))
	remote := s.expect("handshake", 5*time.Second).remote.(*net.TCPAddr)
	if !remote.IP.Equal(src.IP) || !c.LocalAddr().(*net.TCPAddr).IP.Equal(src.IP) {
		t.Fatalf("server saw %v, client bound %v", remote, c.LocalAddr())
	}
	if c.RemoteAddr().String() != s.ln.Addr().String() {
		t.Fatalf("RemoteAddr %v", c.RemoteAddr())
	}
}

func TestClientWriteRaw(t *testing.T) {
	both(t, srvOpts{}, func(t *testing.T, s *testServer) {
		c := dial(t, s)
		body, _ := message.Encode(&message.Message{Type: message.Notify, Route: "x.notify", Data: []byte(`"raw"`)}, nil)
		p, _ := packet.Encode(packet.Data, body)
		ch := c.Pushes("onPush", 1)
		// One packet written in two raw pieces (two frames over WebSocket).
		if err := c.WriteRaw(p[:5]); err != nil {
			t.Fatal(err)
		}
		if err := c.WriteRaw(p[5:]); err != nil {
			t.Fatal(err)
		}
		if got := <-ch; string(got) != `"raw"` {
			t.Fatalf("push %q", got)
		}
	})
}

// TestDialRaw drives the protocol by hand at the packet layer, as server
// tests do.
func TestDialRaw(t *testing.T) {
	both(t, srvOpts{heartbeat: 5}, func(t *testing.T, s *testServer) {
		conn, err := DialRaw(ctx5(t), s.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		if conn.WebSocket() != s.o.ws {
			t.Fatalf("WebSocket() = %v", conn.WebSocket())
		}
		// Nothing arrives before the handshake: ReadPacket times out and the
		// connection stays usable.
		short, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		defer cancel()
		if _, _, err := conn.ReadPacket(short); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("ReadPacket err = %v, want DeadlineExceeded", err)
		}
		if err := conn.WritePacket(packet.Handshake, []byte(`{"sys":{"type":"raw"}}`)); err != nil {
			t.Fatal(err)
		}
		typ, body, err := conn.ReadPacket(ctx5(t))
		if err != nil || typ != packet.Handshake || !bytes.Contains(body, []byte(`"code":200`)) {
			t.Fatalf("reply %s %s %v", typ, body, err)
		}
		if err := conn.WritePacket(packet.HandshakeAck, nil); err != nil {
			t.Fatal(err)
		}
		s.expect("ack", 5*time.Second)
		// A request written as raw bytes.
		mb, _ := message.Encode(&message.Message{Type: message.Request, ID: 9, Route: "x.echo", Data: []byte("42")}, nil)
		pb, _ := packet.Encode(packet.Data, mb)
		if err := conn.WriteRaw(pb); err != nil {
			t.Fatal(err)
		}
		typ, body, err = conn.ReadPacket(ctx5(t))
		var m message.Message
		if err != nil || typ != packet.Data || message.Decode(body, &m, nil, 0) != nil ||
			m.Type != message.Response || m.ID != 9 || string(m.Data) != "42" {
			t.Fatalf("response %s %q %v: %v", typ, body, err, m.String())
		}
		// Read the Kick packet, then the end of the connection.
		mb, _ = message.Encode(&message.Message{Type: message.Request, ID: 10, Route: "x.kick"}, nil)
		if err := conn.WritePacket(packet.Data, mb); err != nil {
			t.Fatal(err)
		}
		typ, body, err = conn.ReadPacket(ctx5(t))
		if err != nil || typ != packet.Kick || string(body) != `{"reason":"bye"}` {
			t.Fatalf("kick %s %q %v", typ, body, err)
		}
		_, _, err = conn.ReadPacket(ctx5(t))
		var ce *CloseError
		if s.o.ws && (!errors.As(err, &ce) || ce.Code != 1000) {
			t.Fatalf("after kick: %v, want CloseError 1000", err)
		}
		if !s.o.ws && err != io.EOF {
			t.Fatalf("after kick: %v, want EOF", err)
		}
	})
}

func TestConnHandshake(t *testing.T) {
	both(t, srvOpts{heartbeat: 7, dict: testDict}, func(t *testing.T, s *testServer) {
		conn, err := DialRaw(ctx5(t), s.addr, WithUser("u"))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		info, err := conn.Handshake(ctx5(t))
		if err != nil || info.Heartbeat != 7*time.Second || info.Dict["onPush"] != 2 {
			t.Fatalf("Handshake %+v %v", info, err)
		}
		if hs := s.expect("handshake", 5*time.Second).hs; hs["user"] != "u" {
			t.Fatalf("user %v", hs["user"])
		}
		s.expect("ack", 5*time.Second)
	})
}

// TestProtocolErrorFromServer checks that an unknown packet type from the
// server ends the client with ErrProtocol.
func TestProtocolErrorFromServer(t *testing.T) {
	s := newServer(t, srvOpts{})
	c := dial(t, s)
	s.expect("ack", 5*time.Second)
	s.mu.Lock()
	for nc := range s.conns {
		nc.Write([]byte{0x09, 0, 0, 0})
	}
	s.mu.Unlock()
	waitDone(t, c)
	if !errors.Is(c.Err(), ErrProtocol) || !errors.Is(c.Err(), packet.ErrWrongType) || !errors.Is(c.Err(), ErrClosed) {
		t.Fatalf("Err() = %v", c.Err())
	}
}

func TestParseAddr(t *testing.T) {
	for _, tc := range []struct{ in, scheme, host, path string }{
		{"127.0.0.1:3250", "tcp", "127.0.0.1:3250", ""},
		{"tcp://h:1", "tcp", "h:1", ""},
		{"ws://h:2/ws?x=1", "ws", "h:2", "/ws?x=1"},
		{"ws://h", "ws", "h:80", "/"},
		{"wss://h", "wss", "h:443", "/"},
	} {
		scheme, host, path, err := parseAddr(tc.in)
		if err != nil || scheme != tc.scheme || host != tc.host || path != tc.path {
			t.Errorf("parseAddr(%q) = %q %q %q %v", tc.in, scheme, host, path, err)
		}
	}
	for _, bad := range []string{"http://h:1", "udp://h:1", "ws://"} {
		if _, _, _, err := parseAddr(bad); err == nil {
			t.Errorf("parseAddr(%q) accepted", bad)
		}
	}
}

// selfSigned returns a server TLS config with a certificate for 127.0.0.1
// and a client TLS config that trusts it.
func selfSigned(t *testing.T) (server, client *tls.Config) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "nanomesh test"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	server = &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}}
	return server, &tls.Config{RootCAs: pool}
}

// TestTLS runs the protocol over TLS: wss:// and TCP with WithTLS.
func TestTLS(t *testing.T) {
	srvTLS, cliTLS := selfSigned(t)
	both(t, srvOpts{tls: srvTLS}, func(t *testing.T, s *testServer) {
		c := dial(t, s, WithTLS(cliTLS))
		var out string
		if err := c.Request(ctx5(t), "x.echo", "secure", &out); err != nil || out != "secure" {
			t.Fatalf("echo %q %v", out, err)
		}
		// Without the test CA the certificate is refused.
		if _, err := Dial(ctx5(t), s.addr, WithTLS(&tls.Config{})); err == nil {
			t.Fatal("untrusted certificate accepted")
		}
	})
}
