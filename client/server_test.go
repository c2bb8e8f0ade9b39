package client

// A tiny protocol server over real sockets for the client's tests: TCP and
// WebSocket (with its own minimal upgrade and framing), handshake, echo,
// error responses, out-of-order responses, pushes, kicks and fragmented or
// coalesced WebSocket frames.

import (
	"bufio"
	"bytes"
	"compress/zlib"
	"crypto/sha1"
	"crypto/tls"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nanomesh/nanomesh/message"
	"github.com/nanomesh/nanomesh/packet"
)

type srvOpts struct {
	ws         bool
	heartbeat  int               // seconds announced in the handshake
	dict       map[string]uint16 // route dictionary announced and used
	serializer string            // announced serializer name ("json" if empty)
	reverseN   int               // x.reverse: answer each batch of n in reverse order
	frag       int               // split every outgoing write into pieces of frag bytes (WS: continuation frames with pings between)
	badAccept  bool              // WS: answer with a wrong Sec-WebSocket-Accept
	tls        *tls.Config       // serve TLS (wss:// or TCP over TLS)
}

type event struct {
	kind   string // handshake, ack, heartbeat, msg, pong, close, ws-unmasked
	hs     map[string]any
	msg    message.Message
	flag   byte // first byte of a Data packet's body
	remote net.Addr
}

type testServer struct {
	t      *testing.T
	o      srvOpts
	ln     net.Listener
	addr   string
	dict   *message.Dictionary
	events chan event
	wg     sync.WaitGroup
	mu     sync.Mutex
	conns  map[net.Conn]bool
}

func newServer(t *testing.T, o srvOpts) *testServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if o.serializer == "" {
		o.serializer = "json"
	}
	dict, err := message.NewDictionary(o.dict)
	if err != nil {
		t.Fatal(err)
	}
	s := &testServer{t: t, o: o, ln: ln, dict: dict, events: make(chan event, 1000), conns: map[net.Conn]bool{}}
	scheme := "tcp://"
	if o.ws {
		scheme = "ws://"
		if o.tls != nil {
			scheme = "wss://"
		}
	}
	s.addr = scheme + ln.Addr().String()
	if o.ws {
		s.addr += "/ws"
	}
	if o.tls != nil {
		s.ln = tls.NewListener(ln, o.tls)
	}
	s.wg.Go(s.accept)
	t.Cleanup(func() {
		ln.Close()
		s.mu.Lock()
		for c := range s.conns {
			c.Close()
		}
		s.mu.Unlock()
		s.wg.Wait()
	})
	return s
}

func (s *testServer) accept() {
	for {
		nc, err := s.ln.Accept()
		if err != nil {
			return
		}
		s.mu.Lock()
		s.conns[nc] = true
		s.mu.Unlock()
		s.wg.Go(func() {
			defer func() {
				nc.Close()
				s.mu.Lock()
				delete(s.conns, nc)
				s.mu.Unlock()
			}()
			sc := &sconn{s: s, nc: nc, br: bufio.NewReader(nc), ws: s.o.ws}
			if err := sc.serve(); err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
				s.emit(event{kind: "error: " + err.Error()})
			}
		})
	}
}

func (s *testServer) emit(e event) {
	select {
	case s.events <- e:
	default:
	}
}

// expect returns the next event of the given kind, skipping others.
func (s *testServer) expect(kind string, within time.Duration) event {
	s.t.Helper()
	timer := time.NewTimer(within)
	defer timer.Stop()
	for {
		select {
		case e := <-s.events:
			if strings.HasPrefix(e.kind, "error") {
				s.t.Fatalf("server: %s", e.kind)
			}
			if e.kind == kind {
				return e
			}
		case <-timer.C:
			s.t.Fatalf("server: no %q event within %v", kind, within)
			return event{}
		}
	}
}

// none checks that no event of the given kind happens within d.
func (s *testServer) none(kind string, d time.Duration) {
	s.t.Helper()
	timer := time.NewTimer(d)
	defer timer.Stop()
	for {
		select {
		case e := <-s.events:
			if e.kind == kind {
				s.t.Fatalf("server: unexpected %q event", kind)
			}
		case <-timer.C:
			return
		}
	}
}

type sconn struct {
	s    *testServer
	nc   net.Conn
	br   *bufio.Reader
	ws   bool
	wmu  sync.Mutex
	held []message.Message
}

func (c *sconn) serve() error {
	if c.ws {
		if err := c.upgrade(); err != nil {
			return err
		}
	}
	dec := packet.NewDecoder(packet.MaxBodyLen)
	inMsg := false
	buf := make([]byte, 4096)
	for {
		var chunk []byte
		if c.ws {
			fin, op, payload, err := c.readFrame()
			if err != nil {
				return err
			}
			switch op {
			case opPing:
				c.writeFrames(opPong, payload, 0)
				continue
			case opPong:
				c.s.emit(event{kind: "pong"})
				continue
			case opClose:
				c.s.emit(event{kind: "close", flag: byte(len(payload))})
				c.writeFrames(opClose, payload, 0)
				return nil
			case opBinary, opContinuation:
				if (op == opBinary) == inMsg {
					return fmt.Errorf("bad fragmentation from client")
				}
				inMsg = !fin
			default:
				return fmt.Errorf("opcode %d from client", op)
			}
			chunk = payload
		} else {
			n, err := c.nc.Read(buf)
			if err != nil {
				return err
			}
			chunk = buf[:n]
		}
		stop := errors.New("stop")
		err := dec.Feed(chunk, func(t packet.Type, body []byte) error {
			done, err := c.handle(t, body)
			if err == nil && done {
				err = stop
			}
			return err
		})
		if errors.Is(err, stop) {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// handle processes one packet; done means the connection should end.
func (c *sconn) handle(t packet.Type, body []byte) (done bool, err error) {
	switch t {
	case packet.Handshake:
		var hs map[string]any
		if err := json.Unmarshal(body, &hs); err != nil {
			return false, err
		}
		c.s.emit(event{kind: "handshake", hs: hs, remote: c.nc.RemoteAddr()})
		user, _ := hs["user"].(map[string]any)
		switch {
		case user["silent"] == true:
			return false, nil
		case user["reject"] == true:
			c.sendJSON(packet.Handshake, map[string]any{"code": 403, "message": "go away"})
			return true, nil
		case user["kick"] == true:
			c.sendJSON(packet.Kick, map[string]any{"reason": "not welcome"})
			return true, nil
		}
		sys := map[string]any{
			"heartbeat":  c.s.o.heartbeat,
			"servertime": time.Now().Unix(),
			"serializer": c.s.o.serializer,
		}
		if c.s.o.dict != nil {
			sys["dict"] = c.s.o.dict
		}
		c.sendJSON(packet.Handshake, map[string]any{"code": 200, "sys": sys})
	case packet.HandshakeAck:
		c.s.emit(event{kind: "ack"})
	case packet.Heartbeat:
		c.s.emit(event{kind: "heartbeat"})
	case packet.Data:
		var m message.Message
		if err := message.Decode(body, &m, c.s.dict, 0); err != nil {
			return false, err
		}
		m.Data = append([]byte(nil), m.Data...)
		c.s.emit(event{kind: "msg", msg: m, flag: body[0]})
		return c.onMessage(m)
	default:
		return false, fmt.Errorf("packet %s from client", t)
	}
	return false, nil
}

func (c *sconn) onMessage(m message.Message) (done bool, err error) {
	resp := func(data []byte, isErr bool) []byte {
		return c.encode(message.Message{Type: message.Response, ID: m.ID, Data: data, Error: isErr})
	}
	if m.Type == message.Notify {
		switch m.Route {
		case "x.notify":
			c.write(c.encode(message.Message{Type: message.Push, Route: "onPush", Data: m.Data}))
		case "x.zpush": // push the data zlib-compressed (pitaya's flag 0x10)
			var z bytes.Buffer
			zw := zlib.NewWriter(&z)
			zw.Write(m.Data)
			zw.Close()
			body := append([]byte{byte(message.Push)<<1 | message.FlagZlib, 6}, "onPush"...)
			p, _ := packet.Encode(packet.Data, append(body, z.Bytes()...))
			c.write(p)
		}
		return false, nil
	}
	switch m.Route {
	case "x.echo":
		c.write(resp(m.Data, false))
	case "x.fail":
		c.write(resp([]byte(`{"code":418,"message":"teapot"}`), true))
	case "x.reverse":
		c.held = append(c.held, m)
		if len(c.held) == c.s.o.reverseN {
			for i := len(c.held) - 1; i >= 0; i-- {
				h := c.held[i]
				c.write(c.encode(message.Message{Type: message.Response, ID: h.ID, Data: h.Data}))
			}
			c.held = nil
		}
	case "x.kick":
		c.sendJSON(packet.Kick, map[string]any{"reason": "bye"})
		if c.ws {
			c.writeFrames(opClose, []byte{0x03, 0xe8}, 0)
		}
		return true, nil
	case "x.close":
		if c.ws {
			c.writeFrames(opClose, append([]byte{0x0f, 0xa0}, "going away"...), 0)
			c.readUntilClose()
		}
		return true, nil
	case "x.multi":
		// Two pushes and the response: one frame holds the first push and
		// part of the second, the next frame the rest and the response.
		p1 := c.encode(message.Message{Type: message.Push, Route: "onPush", Data: []byte(`"1"`)})
		p2 := c.encode(message.Message{Type: message.Push, Route: "onPush", Data: []byte(`"2"`)})
		all := append(append(append([]byte(nil), p1...), p2...), resp(m.Data, false)...)
		cut := len(p1) + 3
		c.write(all[:cut])
		time.Sleep(5 * time.Millisecond)
		c.write(all[cut:])
	case "x.silent":
	default:
		c.write(resp([]byte(`{"code":404,"message":"no route"}`), true))
	}
	return false, nil
}

func (c *sconn) encode(m message.Message) []byte {
	body, err := message.Encode(&m, c.s.dict)
	if err != nil {
		panic(err)
	}
	p, err := packet.Encode(packet.Data, body)
	if err != nil {
		panic(err)
	}
	return p
}

func (c *sconn) sendJSON(t packet.Type, v any) {
	body, _ := json.Marshal(v)
	p, _ := packet.Encode(t, body)
	c.write(p)
}

// write sends bytes of the packet stream: over WebSocket as one binary frame,
// or as fragments of c.s.o.frag bytes.
func (c *sconn) write(b []byte) {
	if c.ws {
		c.writeFrames(opBinary, b, c.s.o.frag)
		return
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if f := c.s.o.frag; f > 0 {
		for len(b) > 0 {
			n := min(f, len(b))
			c.nc.Write(b[:n])
			b = b[n:]
			time.Sleep(time.Millisecond)
		}
		return
	}
	c.nc.Write(b)
}

// writeFrames writes an unmasked message; with frag > 0 a data message is
// split into a first frame and continuation frames of frag bytes, with a
// ping interleaved after every fragment.
func (c *sconn) writeFrames(op byte, b []byte, frag int) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if frag <= 0 || len(b) <= frag {
		c.nc.Write(serverFrame(true, op, b))
		return
	}
	first := true
	for len(b) > 0 {
		n := min(frag, len(b))
		o := byte(opContinuation)
		if first {
			o = op
		}
		c.nc.Write(serverFrame(n == len(b), o, b[:n]))
		if n < len(b) {
			c.nc.Write(serverFrame(true, opPing, []byte("p")))
		}
		b, first = b[n:], false
	}
}

func serverFrame(fin bool, op byte, payload []byte) []byte {
	b0 := op
	if fin {
		b0 |= 0x80
	}
	f := []byte{b0}
	switch n := len(payload); {
	case n <= 125:
		f = append(f, byte(n))
	case n <= 0xffff:
		f = append(f, 126, byte(n>>8), byte(n))
	default:
		f = append(f, 127)
		f = binary.BigEndian.AppendUint64(f, uint64(n))
	}
	return append(f, payload...)
}

// readFrame reads one client frame, which must be masked, and unmasks it.
func (c *sconn) readFrame() (fin bool, op byte, payload []byte, err error) {
	var h [2]byte
	if _, err = io.ReadFull(c.br, h[:]); err != nil {
		return
	}
	fin, op = h[0]&0x80 != 0, h[0]&0x0f
	if h[1]&0x80 == 0 {
		return false, 0, nil, fmt.Errorf("unmasked frame from client")
	}
	n := uint64(h[1] & 0x7f)
	switch n {
	case 126:
		var l [2]byte
		_, err = io.ReadFull(c.br, l[:])
		n = uint64(binary.BigEndian.Uint16(l[:]))
	case 127:
		var l [8]byte
		_, err = io.ReadFull(c.br, l[:])
		n = binary.BigEndian.Uint64(l[:])
	}
	if err != nil {
		return
	}
	var key [4]byte
	if _, err = io.ReadFull(c.br, key[:]); err != nil {
		return
	}
	payload = make([]byte, n)
	if _, err = io.ReadFull(c.br, payload); err != nil {
		return
	}
	for i := range payload {
		payload[i] ^= key[i&3]
	}
	return
}

func (c *sconn) readUntilClose() {
	c.nc.SetReadDeadline(time.Now().Add(2 * time.Second))
	for {
		_, op, payload, err := c.readFrame()
		if err != nil {
			return
		}
		if op == opClose {
			c.s.emit(event{kind: "close", flag: byte(len(payload))})
			return
		}
	}
}

func (c *sconn) upgrade() error {
	req, err := http.ReadRequest(c.br)
	if err != nil {
		return err
	}
	key := req.Header.Get("Sec-WebSocket-Key")
	if req.Method != http.MethodGet || req.URL.Path != "/ws" || key == "" ||
		!strings.EqualFold(req.Header.Get("Upgrade"), "websocket") ||
		!strings.Contains(strings.ToLower(req.Header.Get("Connection")), "upgrade") ||
		req.Header.Get("Sec-WebSocket-Version") != "13" {
		io.WriteString(c.nc, "HTTP/1.1 400 Bad Request\r\nContent-Length: 11\r\n\r\nbad request")
		return fmt.Errorf("bad upgrade request: %v %v", req.Method, req.Header)
	}
	if req.Header.Get("X-Test") == "forbidden" {
		io.WriteString(c.nc, "HTTP/1.1 403 Forbidden\r\nContent-Length: 9\r\n\r\nforbidden")
		return nil
	}
	sum := sha1.Sum([]byte(key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"))
	accept := base64.StdEncoding.EncodeToString(sum[:])
	if c.s.o.badAccept {
		accept = base64.StdEncoding.EncodeToString(make([]byte, 20))
	}
	_, err = io.WriteString(c.nc, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
		"Sec-WebSocket-Accept: "+accept+"\r\n\r\n")
	return err
}
