// Package agent holds client connections: TCP and WebSocket listeners served
// by one nbio event loop, the per-connection handshake state machine,
// heartbeats and liveness on one shared timing wheel, and the bounded write
// backlog. A connection costs no goroutine, no timer and no idle buffer.
package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lesismal/llib/std/crypto/tls"
	"github.com/lesismal/nbio"
	"github.com/lesismal/nbio/logging"
	"github.com/lesismal/nbio/nbhttp"
	"github.com/lesismal/nbio/nbhttp/websocket"
	"github.com/nanomesh/nanomesh/message"
	"github.com/nanomesh/nanomesh/session"
)

// Handler receives the sessions and messages of a Server.
type Handler interface {
	// OnSession is called once a client has completed the handshake.
	OnSession(s *session.Session)
	// OnMessage is called on the event loop for each Request or Notify. It
	// must not block; m.Data is valid only during the call. An error closes
	// the connection (session.ErrQueueFull kicks it as a flooder).
	OnMessage(s *session.Session, m *message.Message) error
	// OnClose is called once when an established session's connection ends,
	// before the session's OnClose callbacks run.
	OnClose(s *session.Session)
}

// ErrServerClosed is returned by Start after Shutdown.
var ErrServerClosed = errors.New("agent: server closed")

// Server accepts clients over TCP and WebSocket on one nbio engine.
type Server struct {
	opts     options
	handler  Handler
	engine   *nbhttp.Engine
	upgrader *websocket.Upgrader
	tcpLn    net.Listener
	wsAddr   string
	wheel    *wheel
	sessions sessionTable
	clock    atomic.Int64 // unix nanos, advanced by the wheel goroutine
	count    atomic.Int64
	// handoff orders a poller's handling of a connection after the setup done
	// by the goroutine that accepted it (ours for TCP, nbio's listener for
	// WebSocket). nbio hands connections over through epoll and a plain array,
	// which the Go memory model (and the race detector) does not see as
	// synchronization: the acceptor adds to handoff before handing over, the
	// poller loads it before touching the connection.
	handoff atomic.Int64
	closing atomic.Bool
	stop    chan struct{}
	wg      sync.WaitGroup
}

// New returns a server that hands sessions and messages to h.
func New(h Handler, opts ...Option) *Server {
	o := defaults()
	for _, opt := range opts {
		opt(&o)
	}
	s := &Server{opts: o, handler: h, stop: make(chan struct{})}
	s.sessions.init()
	s.wheel = newWheel(o.heartbeat, o.tick)
	return s
}

func init() {
	// nbio logs connection-level events at info level; keep it quiet.
	logging.SetLevel(logging.LevelError)
}

// Start opens the listeners and starts the event loop. It returns once the
// server accepts clients.
func (s *Server) Start(ctx context.Context) error {
	if s.opts.tcpAddr == "" && s.opts.tcpLn == nil && s.opts.wsAddr == "" {
		return errors.New("agent: no listener configured (WithTCP or WithWS)")
	}
	s.clock.Store(time.Now().UnixNano())
	pollers := s.opts.pollers
	if pollers <= 0 {
		pollers = runtime.NumCPU()
	}
	conf := nbhttp.Config{
		Name:                    "nanomesh",
		NPoller:                 pollers,
		ReadBufferSize:          32 << 10,
		MaxWriteBufferSize:      s.opts.writeBacklog,
		ReleaseWebsocketPayload: true,
		KeepaliveTime:           s.opts.handshakeTimeout,
		// Run WebSocket frames and HTTP upgrades on the event loop: decoding
		// is cheap and handlers run on the dispatcher's pool anyway.
		ServerExecutor: func(f func()) { f() },
	}
	if s.opts.wsAddr != "" {
		mux := http.NewServeMux()
		if s.opts.mux != nil {
			mux.Handle("/", s.opts.mux)
		}
		mux.HandleFunc(s.opts.wsPath, s.upgrade)
		conf.Handler = mux
		if s.opts.certFile != "" {
			cert, err := tls.LoadX509KeyPair(s.opts.certFile, s.opts.keyFile)
			if err != nil {
				return fmt.Errorf("agent: tls: %w", err)
			}
			conf.AddrsTLS = []string{s.opts.wsAddr}
			conf.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert}}
		} else {
			conf.Addrs = []string{s.opts.wsAddr}
		}
	}
	s.engine = nbhttp.NewEngine(conf)
	s.engine.OnClose(s.onEngineClose)
	s.engine.OnOpen(func(net.Conn) { s.handoff.Add(1) }) // nbio's acceptor, before the hand-over
	s.engine.Engine.OnData(func(c *nbio.Conn, data []byte) {
		s.handoff.Load()
		c.DataHandler()(c, data) // what nbhttp's own OnData does
	})
	s.upgrader = websocket.NewUpgrader()
	s.upgrader.KeepaliveTime = 0 // liveness is the wheel's job: no per-connection deadline
	s.upgrader.CheckOrigin = s.opts.checkOrigin
	// A frame may carry several packets; the decoder enforces the per-packet
	// limit, this only bounds one frame's buffering.
	s.upgrader.MessageLengthLimit = max(4*(s.opts.maxPacket+4), 1<<20)
	s.upgrader.OnMessage(func(ws *websocket.Conn, mt websocket.MessageType, data []byte) {
		c, ok := ws.Session().(*conn)
		if !ok {
			return
		}
		if mt != websocket.BinaryMessage {
			c.kick(ReasonBadPacket)
			return
		}
		c.onData(data)
	})
	if err := s.engine.Start(); err != nil {
		return fmt.Errorf("agent: start: %w", err)
	}
	if len(conf.Addrs) > 0 {
		s.wsAddr = s.engine.Addrs[0]
	} else if len(conf.AddrsTLS) > 0 {
		s.wsAddr = s.engine.AddrsTLS[0]
	}
	if s.opts.tcpLn != nil || s.opts.tcpAddr != "" {
		ln := s.opts.tcpLn
		if ln == nil {
			var err error
			if ln, err = (&net.ListenConfig{}).Listen(ctx, "tcp", s.opts.tcpAddr); err != nil {
				s.engine.Stop()
				return fmt.Errorf("agent: listen tcp: %w", err)
			}
		}
		s.tcpLn = ln
		s.wg.Add(1)
		go s.acceptTCP(ln)
	}
	s.wg.Add(1)
	go s.runWheel()
	return nil
}

// TCPAddr returns the TCP listener's address, or "" if there is none.
func (s *Server) TCPAddr() string {
	if s.tcpLn == nil {
		return ""
	}
	return s.tcpLn.Addr().String()
}

// WSAddr returns the WebSocket listener's address, or "" if there is none.
func (s *Server) WSAddr() string { return s.wsAddr }

// WSPath returns the WebSocket upgrade path.
func (s *Server) WSPath() string { return s.opts.wsPath }

// Count returns the number of open connections, handshaken or not.
func (s *Server) Count() int { return int(s.count.Load()) }

// Sessions returns the number of established sessions.
func (s *Server) Sessions() int { return s.sessions.len() }

// Session returns the established session with id.
func (s *Server) Session(id int64) (*session.Session, bool) {
	c := s.sessions.get(id)
	if c == nil {
		return nil, false
	}
	return &c.sess, true
}

// Range calls fn for every established session until fn returns false.
func (s *Server) Range(fn func(*session.Session) bool) { s.sessions.rangeAll(fn) }

func (s *Server) acceptTCP(ln net.Listener) {
	defer s.wg.Done()
	var delay time.Duration
	for {
		nc, err := ln.Accept()
		if err != nil {
			if s.closing.Load() || errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of fds and the like: back off instead of spinning.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			s.opts.log.Warn().Err(err).Dur("retry", delay).Msg("tcp accept")
			time.Sleep(delay)
			continue
		}
		delay = 0
		if s.closing.Load() {
			_ = nc.Close()
			continue
		}
		nbc, err := nbio.NBConn(nc)
		if err != nil {
			_ = nc.Close()
			continue
		}
		c := s.newConn(nbc, nil)
		nbc.SetSession(c)
		nbc.OnData(func(nbc *nbio.Conn, data []byte) {
			if c, ok := nbc.Session().(*conn); ok {
				c.onData(data)
			}
		})
		s.handoff.Add(1) // publish c to the poller (see handoff)
		if _, err := s.engine.AddConn(nbc); err != nil {
			_ = nbc.Close()
			c.closed(err) // once only, whether or not nbio also reports the close
		}
	}
}

// newConn sets c up completely before it is published to the wheel, which
// may kick it at once (e.g. on Shutdown).
func (s *Server) newConn(nbc *nbio.Conn, ws *websocket.Conn) *conn {
	c := &conn{srv: s, nbc: nbc, ws: ws, created: s.clock.Load(), slot: onNone}
	c.dec.Init(s.opts.maxPacket)
	c.lastRecv.Store(c.created)
	s.count.Add(1)
	s.wheel.addPending(c)
	return c
}

func (s *Server) upgrade(w http.ResponseWriter, r *http.Request) {
	if s.closing.Load() {
		http.Error(w, "shutting down", http.StatusServiceUnavailable)
		return
	}
	ws, err := s.upgrader.Upgrade(w, r, nil)
	if err != nil {
		s.opts.log.Debug().Err(err).Str("remote", r.RemoteAddr).Msg("websocket upgrade")
		return
	}
	c := s.newConn(nil, ws)
	ws.SetSession(c)
}

// onEngineClose runs once per closed nbio connection, TCP or WebSocket.
func (s *Server) onEngineClose(nc net.Conn, err error) {
	s.handoff.Load() // a connection may close before it sent anything
	nbc, ok := nc.(*nbio.Conn)
	if !ok {
		return
	}
	switch v := nbc.Session().(type) {
	case *conn:
		v.closed(err)
	case *websocket.Conn:
		if c, ok := v.Session().(*conn); ok {
			c.closed(err)
		}
	}
}

func (s *Server) runWheel() {
	defer s.wg.Done()
	t := time.NewTicker(s.opts.tick)
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case now := <-t.C:
			ns := now.UnixNano()
			s.clock.Store(ns)
			pending, slot := s.wheel.turn()
			for _, c := range pending {
				c.visit(ns, true)
			}
			for _, c := range slot {
				c.visit(ns, false)
			}
			clear(pending)
			clear(slot)
		}
	}
}

func (s *Server) handshakeReply() []byte {
	type sys struct {
		Heartbeat  int               `json:"heartbeat"`
		ServerTime int64             `json:"servertime"`
		Serializer string            `json:"serializer"`
		Dict       map[string]uint16 `json:"dict,omitempty"`
	}
	b, _ := json.Marshal(struct {
		Code int `json:"code"`
		Sys  sys `json:"sys"`
	}{200, sys{
		Heartbeat:  int(s.opts.heartbeat / time.Second),
		ServerTime: time.Now().Unix(),
		Serializer: s.opts.ser.Name(),
		Dict:       s.opts.dict.Codes(),
	}})
	return b
}

// StopAccepting closes the listeners; established sessions stay.
func (s *Server) StopAccepting() {
	if s.closing.Swap(true) {
		return
	}
	if s.tcpLn != nil {
		_ = s.tcpLn.Close()
	}
}

// Shutdown stops accepting, kicks every connection with reason "shutdown",
// waits (bounded by ctx) for them to close, and stops the event loop.
func (s *Server) Shutdown(ctx context.Context) error {
	s.StopAccepting()
	s.KickAll(ReasonShutdown)
	var err error
	for s.count.Load() > 0 {
		select {
		case <-ctx.Done():
			err = fmt.Errorf("agent: shutdown: %d connections left: %w", s.count.Load(), ctx.Err())
		case <-time.After(5 * time.Millisecond):
			continue
		}
		break
	}
	close(s.stop)
	s.engine.Stop()
	s.wg.Wait()
	return err
}

// KickAll kicks every connection, handshaken or not, with reason.
func (s *Server) KickAll(reason string) {
	s.wheel.mu.Lock()
	var all []*conn
	for c := s.wheel.pending.head; c != nil; c = c.next {
		all = append(all, c)
	}
	for i := range s.wheel.slots {
		for c := s.wheel.slots[i].head; c != nil; c = c.next {
			all = append(all, c)
		}
	}
	s.wheel.mu.Unlock()
	for _, c := range all {
		c.kick(reason)
	}
}
