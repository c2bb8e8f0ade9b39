// Package baseline is the comparison server of the benchmarks: the same wire
// protocol and the same handlers as nanomesh, built the classic way of nano
// and pitaya, with two goroutines per connection (a reader that also runs
// the handlers of its session, and a writer fed by a channel that owns a
// per-connection heartbeat ticker). WebSocket is served by net/http and
// gorilla/websocket. In cluster mode a gate forwards each request to a
// backend with a unary gRPC call (pitaya's shape), with a static backend
// address instead of service discovery.
//
// It reuses nanomesh's packet and message codecs, so that the comparison is
// between the connection architectures, not the codecs.
package baseline

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
	"github.com/nanomesh/nanomesh/message"
	"github.com/nanomesh/nanomesh/packet"
)

// Handler handles one request or notify; s is nil on a backend reached over
// gRPC. For a request, the returned data (or error) is the response.
type Handler func(s *Session, data []byte) ([]byte, *message.Error)

// Remote forwards a message for a route with no local handler.
type Remote func(ctx context.Context, s *Session, route string, data []byte) ([]byte, *message.Error)

// Config configures a Server.
type Config struct {
	Heartbeat        time.Duration
	HandshakeTimeout time.Duration
	WriteBacklog     int // messages queued per connection before pushes are dropped (nano: 16)
	Handlers         map[string]Handler
	Remote           Remote
}

// Server is a goroutine-per-connection protocol server.
type Server struct {
	cfg      Config
	tcpLn    net.Listener
	wsLn     net.Listener
	http     *http.Server
	upgrader websocket.Upgrader
	ids      atomic.Int64

	conns, sessions, opened, dropped atomic.Int64

	mu  sync.Mutex
	all map[*Session]struct{}
}

// New returns a server.
func New(cfg Config) *Server {
	if cfg.Heartbeat <= 0 {
		cfg.Heartbeat = 30 * time.Second
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = 10 * time.Second
	}
	if cfg.WriteBacklog <= 0 {
		cfg.WriteBacklog = 64
	}
	return &Server{cfg: cfg, all: map[*Session]struct{}{},
		upgrader: websocket.Upgrader{CheckOrigin: func(*http.Request) bool { return true }}}
}

// ListenTCP serves raw TCP clients on addr and returns the bound address.
func (s *Server) ListenTCP(addr string) (string, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return "", err
	}
	s.tcpLn = ln
	go func() {
		for {
			nc, err := ln.Accept()
			if err != nil {
				if errors.Is(err, net.ErrClosed) {
					return
				}
				time.Sleep(5 * time.Millisecond)
				continue
			}
			go s.serve(&tcpTransport{nc: nc}, nc)
		}
	}()
	return ln.Addr().String(), nil
}

// ListenWS serves WebSocket clients at path on addr and returns the bound address.
func (s *Server) ListenWS(addr, path string) (string, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return "", err
	}
	s.wsLn = ln
	mux := http.NewServeMux()
	mux.HandleFunc(path, func(w http.ResponseWriter, r *http.Request) {
		ws, err := s.upgrader.Upgrade(w, r, nil)
		if err != nil {
			return
		}
		// The HTTP handler's goroutine becomes the reader.
		s.serve(&wsTransport{ws: ws}, ws.UnderlyingConn())
	})
	s.http = &http.Server{Handler: mux}
	go func() { _ = s.http.Serve(ln) }()
	return ln.Addr().String(), nil
}

// Close stops listening and closes every connection.
func (s *Server) Close() {
	if s.tcpLn != nil {
		s.tcpLn.Close()
	}
	if s.http != nil {
		s.http.Close()
	}
	s.mu.Lock()
	for c := range s.all {
		c.close()
	}
	s.mu.Unlock()
}

// Stats are the server's counters.
type Stats struct {
	Conns    int64 `json:"conns"`
	Sessions int64 `json:"sessions"`
	Opened   int64 `json:"opened"`
	Dropped  int64 `json:"dropped"`
}

// Stats returns the server's counters.
func (s *Server) Stats() Stats {
	return Stats{Conns: s.conns.Load(), Sessions: s.sessions.Load(), Opened: s.opened.Load(), Dropped: s.dropped.Load()}
}

type transport interface {
	read(buf []byte) (int, error)
	write(b []byte) error
	close() error
}

type tcpTransport struct{ nc net.Conn }

func (t *tcpTransport) read(b []byte) (int, error) { return t.nc.Read(b) }
func (t *tcpTransport) write(b []byte) error {
	_, err := t.nc.Write(b)
	return err
}
func (t *tcpTransport) close() error { return t.nc.Close() }

type wsTransport struct {
	ws *websocket.Conn
	r  interface{ Read([]byte) (int, error) }
}

func (t *wsTransport) read(b []byte) (int, error) {
	for {
		if t.r == nil {
			_, r, err := t.ws.NextReader()
			if err != nil {
				return 0, err
			}
			t.r = r
		}
		n, err := t.r.Read(b)
		if err != nil {
			t.r = nil
			if n > 0 {
				return n, nil
			}
			if errors.Is(err, io.EOF) {
				continue
			}
			return 0, err
		}
		if n > 0 {
			return n, nil
		}
	}
}
func (t *wsTransport) write(b []byte) error { return t.ws.WriteMessage(websocket.BinaryMessage, b) }
func (t *wsTransport) close() error         { return t.ws.Close() }

type outMsg struct {
	pkt   packet.Type // a bare packet (handshake, kick), or 0 for a message
	body  []byte
	typ   message.Type
	route string
	mid   uint64
	isErr bool
}

// Session is one client connection.
type Session struct {
	srv       *Server
	id        int64
	t         transport
	nc        net.Conn
	out       chan outMsg
	done      chan struct{}
	once      sync.Once
	lastAt    atomic.Int64
	working   atomic.Bool
	onClose   []func()
	mu        sync.Mutex
	closeDone bool
}

// ID returns the session id.
func (c *Session) ID() int64 { return c.id }

// OnClose registers fn to run when the session ends.
func (c *Session) OnClose(fn func()) {
	c.mu.Lock()
	if c.closeDone {
		c.mu.Unlock()
		fn()
		return
	}
	c.onClose = append(c.onClose, fn)
	c.mu.Unlock()
}

func (s *Server) serve(t transport, nc net.Conn) {
	c := &Session{srv: s, t: t, nc: nc, out: make(chan outMsg, s.cfg.WriteBacklog), done: make(chan struct{})}
	c.lastAt.Store(time.Now().UnixNano())
	s.conns.Add(1)
	s.mu.Lock()
	s.all[c] = struct{}{}
	s.mu.Unlock()
	go c.writeLoop()
	c.readLoop()
}

func (c *Session) close() {
	c.once.Do(func() {
		close(c.done)
		_ = c.t.close()
	})
}

func (c *Session) readLoop() {
	s := c.srv
	defer func() {
		c.close()
		if c.working.Load() {
			s.sessions.Add(-1)
		}
		s.conns.Add(-1)
		s.mu.Lock()
		delete(s.all, c)
		s.mu.Unlock()
		c.mu.Lock()
		c.closeDone = true
		fns := c.onClose
		c.onClose = nil
		c.mu.Unlock()
		for _, fn := range fns {
			fn()
		}
	}()
	buf := make([]byte, 2048) // nano's per-connection read buffer
	var dec packet.Decoder
	dec.Init(0)
	_ = c.nc.SetReadDeadline(time.Now().Add(s.cfg.HandshakeTimeout))
	for {
		n, err := c.t.read(buf)
		if err != nil {
			return
		}
		c.lastAt.Store(time.Now().UnixNano())
		if err := dec.Feed(buf[:n], c.onPacket); err != nil {
			return
		}
	}
}

var errProtocol = errors.New("protocol error")

func (c *Session) onPacket(t packet.Type, body []byte) error {
	s := c.srv
	switch t {
	case packet.Handshake:
		if c.working.Load() {
			return errProtocol
		}
		reply := `{"code":200,"sys":{"heartbeat":` + strconv.Itoa(int(s.cfg.Heartbeat/time.Second)) +
			`,"servertime":` + strconv.FormatInt(time.Now().Unix(), 10) + `,"serializer":"json"}}`
		c.send(outMsg{pkt: packet.Handshake, body: []byte(reply)})
	case packet.HandshakeAck:
		if !c.working.Swap(true) {
			c.id = s.ids.Add(1)
			s.sessions.Add(1)
			s.opened.Add(1)
			_ = c.nc.SetReadDeadline(time.Time{})
		}
	case packet.Heartbeat:
	case packet.Data:
		if !c.working.Load() {
			return errProtocol
		}
		var m message.Message
		if err := message.Decode(body, &m, nil, packet.DefaultMaxBody); err != nil {
			return err
		}
		c.handle(&m)
	default:
		return errProtocol
	}
	return nil
}

func (c *Session) handle(m *message.Message) {
	s := c.srv
	var resp []byte
	var me *message.Error
	if h := s.cfg.Handlers[m.Route]; h != nil {
		resp, me = h(c, m.Data)
	} else if s.cfg.Remote != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		resp, me = s.cfg.Remote(ctx, c, m.Route, append([]byte(nil), m.Data...))
		cancel()
	} else {
		me = message.NewError(message.CodeNotFound, "route %q not found", m.Route)
	}
	if m.Type != message.Request {
		return
	}
	if me != nil {
		c.send(outMsg{typ: message.Response, mid: m.ID, body: message.MarshalError(message.JSON, me), isErr: true})
		return
	}
	c.send(outMsg{typ: message.Response, mid: m.ID, body: resp})
}

// send queues a response or packet, waiting for room.
func (c *Session) send(o outMsg) {
	select {
	case c.out <- o:
	case <-c.done:
	}
}

// Push queues a push; like nano, it fails when the write backlog is full.
func (c *Session) Push(route string, data []byte) error {
	select {
	case c.out <- outMsg{typ: message.Push, route: route, body: data}:
		return nil
	case <-c.done:
		return errors.New("closed")
	default:
		c.srv.dropped.Add(1)
		return errors.New("write backlog full")
	}
}

func (c *Session) writeLoop() {
	s := c.srv
	tick := time.NewTicker(s.cfg.Heartbeat)
	defer tick.Stop()
	var buf []byte
	for {
		select {
		case <-c.done:
			return
		case <-tick.C:
			if !c.working.Load() {
				continue
			}
			if time.Since(time.Unix(0, c.lastAt.Load())) > 2*s.cfg.Heartbeat {
				c.close()
				return
			}
			buf, _ = packet.Append(buf[:0], packet.Heartbeat, nil)
		case o := <-c.out:
			if o.pkt != 0 {
				buf, _ = packet.Append(buf[:0], o.pkt, o.body)
			} else {
				buf = append(buf[:0], 0, 0, 0, 0)
				buf, _ = message.Append(buf, &message.Message{Type: o.typ, ID: o.mid, Route: o.route, Data: o.body, Error: o.isErr}, nil)
				packet.PutHeader(buf, packet.Data, len(buf)-packet.HeaderLen)
			}
		}
		if err := c.t.write(buf); err != nil {
			c.close()
			return
		}
	}
}

// Group is a set of sessions for broadcasts (nano's Group: a map under a lock).
type Group struct {
	mu      sync.RWMutex
	members map[int64]*Session
}

// NewGroup returns an empty group.
func NewGroup() *Group { return &Group{members: map[int64]*Session{}} }

// Add adds c; it leaves when its connection ends.
func (g *Group) Add(c *Session) {
	g.mu.Lock()
	g.members[c.id] = c
	g.mu.Unlock()
	c.OnClose(func() {
		g.mu.Lock()
		delete(g.members, c.id)
		g.mu.Unlock()
	})
}

// Broadcast pushes data on route to every member.
func (g *Group) Broadcast(route string, data []byte) {
	g.mu.RLock()
	ms := make([]*Session, 0, len(g.members))
	for _, c := range g.members {
		ms = append(ms, c)
	}
	g.mu.RUnlock()
	for _, c := range ms {
		_ = c.Push(route, data)
	}
}

// EchoMsg is the echo request and response body.
type EchoMsg struct {
	Msg string `json:"msg"`
}

// Handlers returns the bench handlers ("bench.echo", "bench.ping",
// "bench.join", "bench.shout"), the same as nanomesh's bench component.
func Handlers(group *Group) map[string]Handler {
	ok := []byte(`{"code":0}`)
	return map[string]Handler{
		"bench.echo": func(_ *Session, data []byte) ([]byte, *message.Error) {
			var m EchoMsg
			if err := json.Unmarshal(data, &m); err != nil {
				return nil, message.NewError(message.CodeBadRequest, "bad request body: %v", err)
			}
			b, err := json.Marshal(&m)
			if err != nil {
				return nil, message.NewError(message.CodeInternal, "%v", err)
			}
			return b, nil
		},
		"bench.ping": func(_ *Session, _ []byte) ([]byte, *message.Error) { return ok, nil },
		"bench.join": func(s *Session, _ []byte) ([]byte, *message.Error) {
			if s == nil {
				return nil, message.NewError(message.CodeInternal, "join needs a local session")
			}
			group.Add(s)
			return ok, nil
		},
		"bench.shout": func(_ *Session, data []byte) ([]byte, *message.Error) {
			group.Broadcast("onShout", data)
			return ok, nil
		},
	}
}

// String describes the stats.
func (st Stats) String() string {
	return fmt.Sprintf("conns=%d sessions=%d opened=%d dropped=%d", st.Conns, st.Sessions, st.Opened, st.Dropped)
}
