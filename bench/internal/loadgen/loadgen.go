// Package loadgen is the benchmark's load generator: tens of thousands of
// protocol clients (TCP or WebSocket) per process on one nbio engine, with
// no goroutine, timer or read buffer per connection. A client connects from
// one of several 127.0.0.x source addresses, completes the handshake, answers
// server heartbeats, and then, depending on the mode, stays idle, runs
// closed-loop requests, joins a group and receives (or sends) broadcasts, or
// churns through connect/handshake/close cycles.
//
// It runs as a child process of the bench command (see Main and Start), so a
// large number of clients can be sharded over several processes, each under
// the per-process open-file limit.
package loadgen

import (
	"bytes"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/lesismal/nbio"
	"github.com/lesismal/nbio/logging"
	"github.com/nanomesh/nanomesh/bench/internal/hist"
	"github.com/nanomesh/nanomesh/message"
	"github.com/nanomesh/nanomesh/packet"
)

// Modes.
const (
	ModeIdle      = "idle"      // connect, handshake, answer heartbeats
	ModeEcho      = "echo"      // closed-loop requests on Route
	ModeBroadcast = "broadcast" // join a group; senders request Route, everyone counts pushes
	ModeChurn     = "churn"     // connect, handshake, ack, close, repeat
)

// Config configures one load generator process.
type Config struct {
	Shard     int      `json:"shard"`
	Mode      string   `json:"mode"`
	Transport string   `json:"transport"` // "tcp" or "ws"
	Targets   []string `json:"targets"`   // server "ip:port"s, used round-robin
	WSPath    string   `json:"wsPath"`
	Sources   []string `json:"sources"`  // local IPs to dial from, round-robin
	N         int      `json:"n"`        // clients (churn: concurrent workers)
	Inflight  int      `json:"inflight"` // connects+handshakes in progress at most
	Pollers   int      `json:"pollers"`
	// ConnectTimeout bounds connect + handshake of one client.
	ConnectTimeout time.Duration `json:"connectTimeout"`

	Route          string        `json:"route"`   // echo request / broadcast send route
	Payload        string        `json:"payload"` // echo request body
	RequestTimeout time.Duration `json:"requestTimeout"`
	JoinRoute      string        `json:"joinRoute"`
	PushRoute      string        `json:"pushRoute"`
	Senders        int           `json:"senders"` // broadcast senders among this shard's clients
	Cycles         int           `json:"cycles"`  // churn: cycles of this shard
}

func (c *Config) defaults() {
	if c.Transport == "" {
		c.Transport = "tcp"
	}
	if c.WSPath == "" {
		c.WSPath = "/nano"
	}
	if len(c.Sources) == 0 {
		c.Sources = []string{"127.0.0.1"}
	}
	if c.Inflight <= 0 {
		c.Inflight = 256
	}
	if c.Pollers <= 0 {
		c.Pollers = 1
	}
	if c.ConnectTimeout <= 0 {
		c.ConnectTimeout = 30 * time.Second
	}
	if c.RequestTimeout <= 0 {
		c.RequestTimeout = 5 * time.Second
	}
}

// Client states.
const (
	stDialing uint32 = iota
	stUpgrade
	stHandshake
	stReady
	stClosed
)

// Load phases.
const (
	phIdle int32 = iota
	phWarmup
	phMeasure
	phStopping
)

// Counters are the figures a generator reports.
type Counters struct {
	Ready          int64            `json:"ready"`
	Failed         int64            `json:"failed"`
	ClosedByServer int64            `json:"closedByServer"`
	Kicked         int64            `json:"kicked"`
	KickReasons    map[string]int64 `json:"kickReasons,omitempty"`
	HeartbeatsRecv int64            `json:"heartbeatsRecv"`
	RequestsSent   int64            `json:"requestsSent"`
	Responses      int64            `json:"responses"`
	ErrorResponses int64            `json:"errorResponses"`
	ErrorCodes     map[string]int64 `json:"errorCodes,omitempty"`
	Timeouts       int64            `json:"timeouts"`
	Pushes         int64            `json:"pushes"`
	Joined         int64            `json:"joined"`
	Cycles         int64            `json:"cycles"`
	ConnectErrors  map[string]int64 `json:"connectErrors,omitempty"`
	// CloseReasons are the errors with which established clients were
	// closed by the server ("EOF", "connection reset by peer", ...), and
	// ProtocolErrors what made this generator drop an established client.
	CloseReasons map[string]int64 `json:"closeReasons,omitempty"`
	// CloseAges samples how long (seconds) established clients closed by
	// the server had been established, and how long ago the last packet
	// from the server came: "age/idle".
	CloseAges      []string         `json:"closeAges,omitempty"`
	ProtocolErrors map[string]int64 `json:"protocolErrors,omitempty"`
}

// Gen is a running load generator.
type Gen struct {
	cfg     Config
	eng     *nbio.Engine
	base    time.Time
	targets []string
	sources []*net.TCPAddr
	hsBody  []byte

	clients []*client // idle/echo/broadcast, indexed by creation order
	cmu     sync.Mutex

	sem     chan struct{}
	pmu     sync.Mutex
	pending map[*client]struct{}

	phase atomic.Int32
	lat   hist.H // request or push latency

	ready, failed, closedByServer, kicked, hbRecv atomic.Int64
	reqSent, resps, errResps, timeouts, pushes    atomic.Int64
	joined, cycles                                atomic.Int64

	emu         sync.Mutex
	connErrs    map[string]int64
	closeErrs   map[string]int64
	closeAges   []string
	protoErrs   map[string]int64
	kickReasons map[string]int64
	errCodes    map[string]int64

	measureStart, measureEnd atomic.Int64 // nanotime
}

// client is one protocol client. Fields up to mu are touched only on the
// connection's poller goroutine (and before the connection is added to it).
type client struct {
	g     *Gen
	nc    *nbio.Conn
	onPkt packet.Handler
	dec   packet.Decoder
	state atomic.Uint32
	ws    bool
	// WebSocket frame parsing
	fh      [14]byte
	fhn     uint8
	fop     byte
	frem    uint64
	infr    bool
	ctl     []byte
	up      []byte
	born    int64
	readyAt int64     // nanotime when the handshake completed
	lastIn  int64     // nanotime of the last packet from the server
	done    chan bool // churn: handshake result

	id int64 // unique among all generators: shard<<32 | index

	mu      sync.Mutex // request state
	mid     uint64
	sentAt  int64 // nanotime of the outstanding request, 0 if none
	sender  bool
	gotResp bool
	gotOwn  bool
	closing bool // closed by us
}

func (g *Gen) now() int64 { return int64(time.Since(g.base)) }

// New prepares a generator (it does not connect yet).
func New(cfg Config) (*Gen, error) {
	cfg.defaults()
	g := &Gen{cfg: cfg, base: time.Now(), targets: cfg.Targets,
		pending: map[*client]struct{}{}, connErrs: map[string]int64{},
		closeErrs: map[string]int64{}, protoErrs: map[string]int64{},
		kickReasons: map[string]int64{}, errCodes: map[string]int64{}}
	if len(g.targets) == 0 {
		return nil, errors.New("loadgen: no targets")
	}
	for _, s := range cfg.Sources {
		ip := net.ParseIP(s)
		if ip == nil {
			return nil, fmt.Errorf("loadgen: bad source %q", s)
		}
		g.sources = append(g.sources, &net.TCPAddr{IP: ip})
	}
	g.hsBody = []byte(`{"sys":{"type":"nanomesh-bench","version":"0.1.0"},"user":{}}`)
	logging.SetLevel(logging.LevelNone)
	g.eng = nbio.NewEngine(nbio.Config{
		Name:           fmt.Sprintf("loadgen-%d", cfg.Shard),
		NPoller:        cfg.Pollers,
		ReadBufferSize: 16 << 10,
	})
	g.eng.OnData(func(nc *nbio.Conn, data []byte) {
		if c, ok := nc.Session().(*client); ok {
			c.onData(data)
		}
	})
	g.eng.OnClose(func(nc *nbio.Conn, err error) {
		if c, ok := nc.Session().(*client); ok {
			c.onClose(err)
		}
	})
	if err := g.eng.Start(); err != nil {
		return nil, err
	}
	return g, nil
}

// Stop closes every connection and the engine.
func (g *Gen) Stop() { g.eng.Stop() }

func (g *Gen) connErr(err error) { g.countErr(g.connErrs, err) }

func (g *Gen) countErr(m map[string]int64, err error) {
	s := "nil"
	if err != nil {
		s = err.Error()
	}
	// Keep the error kind, not the addresses.
	var se syscall.Errno
	var oe *net.OpError
	var ne net.Error
	switch {
	case errors.As(err, &se):
		s = se.Error()
	case errors.As(err, &ne) && ne.Timeout():
		s = "timeout"
		if errors.As(err, &oe) {
			s = oe.Op + " timeout"
		}
	case errors.As(err, &oe):
		s = oe.Op + ": " + oe.Err.Error()
	}
	if len(s) > 80 {
		s = s[:80]
	}
	g.emu.Lock()
	m[s]++
	g.emu.Unlock()
}

// ipBindAddressNoPort lets the kernel pick the source port at connect time,
// per 4-tuple, instead of at bind time, so a source IP is not limited to one
// ephemeral port range for all destinations.
const ipBindAddressNoPort = 24

func (g *Gen) dial(i int) (*nbio.Conn, error) {
	d := net.Dialer{
		Timeout:   g.cfg.ConnectTimeout,
		LocalAddr: g.sources[(i/len(g.targets))%len(g.sources)],
		Control: func(_, _ string, rc syscall.RawConn) error {
			var serr error
			err := rc.Control(func(fd uintptr) {
				serr = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_IP, ipBindAddressNoPort, 1)
			})
			if err != nil {
				return err
			}
			return serr
		},
	}
	conn, err := d.Dial("tcp", g.targets[i%len(g.targets)])
	if err != nil {
		return nil, err
	}
	nc, err := nbio.NBConn(conn)
	if err != nil {
		conn.Close()
		return nil, err
	}
	return nc, nil
}

func (g *Gen) newClient(nc *nbio.Conn) *client {
	c := &client{g: g, nc: nc, ws: g.cfg.Transport == "ws", born: g.now()}
	c.onPkt = c.onPacket
	c.dec.Init(0)
	nc.SetSession(c)
	return c
}

// start sends the first bytes: the WebSocket upgrade or the handshake.
func (c *client) start() error {
	if c.ws {
		c.state.Store(stUpgrade)
		var key [16]byte
		binary.LittleEndian.PutUint64(key[:], rand.Uint64())
		binary.LittleEndian.PutUint64(key[8:], rand.Uint64())
		req := "GET " + c.g.cfg.WSPath + " HTTP/1.1\r\nHost: " + c.nc.RemoteAddr().String() +
			"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: " +
			base64.StdEncoding.EncodeToString(key[:]) + "\r\nSec-WebSocket-Version: 13\r\n\r\n"
		_, err := c.nc.Write([]byte(req))
		return err
	}
	c.state.Store(stHandshake)
	return c.writePacket(packet.Handshake, c.g.hsBody)
}

var bufs = sync.Pool{New: func() any { b := make([]byte, 0, 512); return &b }}

func (c *client) writePacket(t packet.Type, body []byte) error {
	pb := bufs.Get().(*[]byte)
	b, _ := packet.Append((*pb)[:0], t, body)
	err := c.write(b)
	*pb = b[:0]
	bufs.Put(pb)
	return err
}

func (c *client) writeMessage(m *message.Message) error {
	pb := bufs.Get().(*[]byte)
	b := append((*pb)[:0], 0, 0, 0, 0)
	b, err := message.Append(b, m, nil)
	if err == nil {
		packet.PutHeader(b, packet.Data, len(b)-packet.HeaderLen)
		err = c.write(b)
	}
	*pb = b[:0]
	bufs.Put(pb)
	return err
}

// write sends one chunk of the packet stream: as is over TCP, in one masked
// binary frame over WebSocket.
func (c *client) write(b []byte) error {
	if !c.ws {
		_, err := c.nc.Write(b)
		return err
	}
	pb := bufs.Get().(*[]byte)
	f := (*pb)[:0]
	n := len(b)
	switch {
	case n <= 125:
		f = append(f, 0x82, 0x80|byte(n))
	case n <= 0xffff:
		f = append(f, 0x82, 0x80|126, byte(n>>8), byte(n))
	default:
		f = append(f, 0x82, 0x80|127)
		f = binary.BigEndian.AppendUint64(f, uint64(n))
	}
	key := rand.Uint32()
	f = binary.BigEndian.AppendUint32(f, key)
	var k [4]byte
	binary.BigEndian.PutUint32(k[:], key)
	start := len(f)
	f = append(f, b...)
	for i := range f[start:] {
		f[start+i] ^= k[i&3]
	}
	_, err := c.nc.Write(f)
	*pb = f[:0]
	bufs.Put(pb)
	return err
}

func (c *client) onData(data []byte) {
	switch {
	case c.state.Load() == stUpgrade:
		c.up = append(c.up, data...)
		i := bytes.Index(c.up, []byte("\r\n\r\n"))
		if i < 0 {
			if len(c.up) > 8<<10 {
				c.fail(errors.New("websocket upgrade: response too long"))
			}
			return
		}
		if !bytes.HasPrefix(c.up, []byte("HTTP/1.1 101")) {
			line, _, _ := bytes.Cut(c.up, []byte("\r\n"))
			c.fail(fmt.Errorf("websocket upgrade: %s", line))
			return
		}
		rest := c.up[i+4:]
		c.up = nil
		c.state.Store(stHandshake)
		if err := c.writePacket(packet.Handshake, c.g.hsBody); err != nil {
			c.fail(err)
			return
		}
		if len(rest) > 0 {
			c.wsFeed(rest)
		}
	case c.ws:
		c.wsFeed(data)
	default:
		c.feed(data)
	}
}

func (c *client) feed(b []byte) {
	if err := c.dec.Feed(b, c.onPkt); err != nil {
		c.fail(err)
	}
}

// wsFeed parses server frames (unmasked) and feeds data frame payloads to the
// packet decoder as one stream.
func (c *client) wsFeed(b []byte) {
	for len(b) > 0 && c.state.Load() != stClosed {
		if !c.infr {
			// Collect the frame header.
			need := 2
			if c.fhn >= 2 {
				need = 2
				switch c.fh[1] & 0x7f {
				case 126:
					need += 2
				case 127:
					need += 8
				}
				if c.fh[1]&0x80 != 0 {
					need += 4
				}
			}
			k := copy(c.fh[c.fhn:need], b)
			c.fhn += uint8(k)
			b = b[k:]
			if int(c.fhn) < need {
				continue
			}
			if need == 2 && (c.fh[1]&0x7f >= 126 || c.fh[1]&0x80 != 0) {
				continue // now that the length code is known, read the rest of the header
			}
			c.fop = c.fh[0] & 0x0f
			switch l := c.fh[1] & 0x7f; l {
			case 126:
				c.frem = uint64(binary.BigEndian.Uint16(c.fh[2:]))
			case 127:
				c.frem = binary.BigEndian.Uint64(c.fh[2:])
			default:
				c.frem = uint64(l)
			}
			c.fhn = 0
			c.infr = true
			if c.frem == 0 {
				c.frameDone()
			}
			continue
		}
		k := int(min(c.frem, uint64(len(b))))
		chunk := b[:k]
		b = b[k:]
		c.frem -= uint64(k)
		switch c.fop {
		case 0x0, 0x1, 0x2:
			c.feed(chunk)
		default:
			c.ctl = append(c.ctl, chunk...)
		}
		if c.frem == 0 {
			c.frameDone()
		}
	}
}

func (c *client) frameDone() {
	c.infr = false
	switch c.fop {
	case 0x8: // close
		c.nc.Close()
	case 0x9: // ping: answer with a pong carrying the same payload
		p := c.ctl
		f := []byte{0x8a, 0x80 | byte(len(p)), 0, 0, 0, 0}
		_, _ = c.nc.Write(append(f, p...))
	}
	c.ctl = nil
}

func (c *client) onPacket(t packet.Type, body []byte) error {
	g := c.g
	c.lastIn = g.now()
	switch t {
	case packet.Handshake:
		if c.state.Load() != stHandshake {
			return errors.New("unexpected handshake")
		}
		if !bytes.Contains(body, []byte(`"code":200`)) {
			return fmt.Errorf("handshake refused: %.80s", body)
		}
		if err := c.writePacket(packet.HandshakeAck, nil); err != nil {
			return err
		}
		c.state.Store(stReady)
		c.readyAt = g.now()
		g.onReady(c)
	case packet.Heartbeat:
		g.hbRecv.Add(1)
		return c.writePacket(packet.Heartbeat, nil)
	case packet.Data:
		var m message.Message
		if err := message.Decode(body, &m, nil, 0); err != nil {
			return err
		}
		switch m.Type {
		case message.Response:
			g.onResponse(c, &m)
		case message.Push:
			g.onPush(c, &m)
		}
	case packet.Kick:
		g.kicked.Add(1)
		r := string(body)
		if len(r) > 80 {
			r = r[:80]
		}
		g.emu.Lock()
		g.kickReasons[r]++
		g.emu.Unlock()
	}
	return nil
}

// fail ends a client that could not connect or broke the protocol; the
// error is accounted for when the close event arrives.
func (c *client) fail(err error) {
	if c.state.Load() == stReady {
		c.g.countErr(c.g.protoErrs, err)
		c.mu.Lock()
		c.closing = true
		c.mu.Unlock()
	}
	c.nc.CloseWithError(err)
}

func (c *client) onClose(err error) {
	g := c.g
	prev := c.state.Swap(stClosed)
	c.mu.Lock()
	closing := c.closing
	c.mu.Unlock()
	if prev == stReady {
		if !closing {
			g.closedByServer.Add(1)
			g.countErr(g.closeErrs, err)
			now := g.now()
			g.emu.Lock()
			if len(g.closeAges) < 20 {
				g.closeAges = append(g.closeAges, fmt.Sprintf("%.1f/%.1f", float64(now-c.readyAt)/1e9, float64(now-c.lastIn)/1e9))
			}
			g.emu.Unlock()
		}
		return
	}
	if prev == stClosed {
		return
	}
	if err == nil {
		err = errors.New("closed by server during handshake")
	}
	if c.done != nil {
		if !closing {
			g.connErr(err)
		}
		select {
		case c.done <- false:
		default:
		}
		return
	}
	if g.settle(c, false) {
		g.connErr(err)
	}
}

// onReady runs on the poller when the handshake completed.
func (g *Gen) onReady(c *client) {
	if c.done != nil {
		c.done <- true
		return
	}
	g.settle(c, true)
	if g.cfg.Mode == ModeBroadcast && g.cfg.JoinRoute != "" {
		c.mu.Lock()
		c.mid++
		mid := c.mid
		c.sentAt = g.now()
		c.mu.Unlock()
		_ = c.writeMessage(&message.Message{Type: message.Request, ID: mid, Route: g.cfg.JoinRoute})
	}
}

// settle accounts for a client that finished connecting, one way or the
// other, reporting whether it was still pending.
func (g *Gen) settle(c *client, ok bool) bool {
	g.pmu.Lock()
	_, was := g.pending[c]
	delete(g.pending, c)
	g.pmu.Unlock()
	if !was {
		return false
	}
	if ok {
		g.ready.Add(1)
	} else {
		g.failed.Add(1)
	}
	<-g.sem
	return true
}

// sendRequest sends the next closed-loop request of c.
func (g *Gen) sendRequest(c *client, payload []byte) {
	c.mu.Lock()
	c.mid++
	mid := c.mid
	c.sentAt = g.now()
	c.gotResp, c.gotOwn = false, false
	c.mu.Unlock()
	g.reqSent.Add(1)
	if err := c.writeMessage(&message.Message{Type: message.Request, ID: mid, Route: g.cfg.Route, Data: payload}); err != nil {
		c.mu.Lock()
		c.sentAt = 0
		c.mu.Unlock()
	}
}

// shoutPayload is a broadcast body: the send time and the sender's id.
func (g *Gen) shoutPayload(c *client) []byte {
	b := strconv.AppendInt([]byte(`{"t":`), time.Now().UnixNano(), 10)
	b = strconv.AppendInt(append(b, `,"s":`...), c.id, 10)
	return append(b, '}')
}

// jsonInt returns the integer after key (such as `"t":`) in b.
func jsonInt(b []byte, key string) (int64, bool) {
	i := bytes.Index(b, []byte(key))
	if i < 0 {
		return 0, false
	}
	var v int64
	j := i + len(key)
	for ; j < len(b) && b[j] >= '0' && b[j] <= '9'; j++ {
		v = v*10 + int64(b[j]-'0')
	}
	return v, j > i+len(key)
}

func (g *Gen) onResponse(c *client, m *message.Message) {
	now := g.now()
	c.mu.Lock()
	if m.ID != c.mid || c.sentAt == 0 {
		c.mu.Unlock()
		return // a response to a request given up as timed out
	}
	sent := c.sentAt
	c.sentAt = 0
	c.gotResp = true
	next := c.sender && c.gotOwn
	c.mu.Unlock()
	ph := g.phase.Load()
	if g.cfg.Mode == ModeBroadcast && ph == phIdle {
		if m.Error {
			g.errResps.Add(1)
		} else {
			g.joined.Add(1)
		}
		return
	}
	if m.Error {
		g.errResps.Add(1)
		code := "?"
		if i := bytes.Index(m.Data, []byte(`"code":`)); i >= 0 {
			j := i + 7
			for j < len(m.Data) && m.Data[j] >= '0' && m.Data[j] <= '9' {
				j++
			}
			code = string(m.Data[i+7 : j])
		}
		g.emu.Lock()
		g.errCodes[code]++
		g.emu.Unlock()
	}
	if ph == phMeasure {
		g.resps.Add(1)
		if g.cfg.Mode == ModeEcho && !m.Error {
			g.lat.Record(now - sent)
		}
	}
	if ph != phWarmup && ph != phMeasure {
		return
	}
	switch g.cfg.Mode {
	case ModeEcho:
		g.sendRequest(c, []byte(g.cfg.Payload))
	case ModeBroadcast:
		if next {
			g.sendRequest(c, g.shoutPayload(c))
		}
	}
}

func (g *Gen) onPush(c *client, m *message.Message) {
	if g.cfg.PushRoute != "" && m.Route != g.cfg.PushRoute {
		return
	}
	ph := g.phase.Load()
	if ph == phMeasure {
		g.pushes.Add(1)
		if t, ok := jsonInt(m.Data, `"t":`); ok {
			g.lat.Record(time.Now().UnixNano() - t)
		}
	}
	if !c.sender {
		return
	}
	if from, _ := jsonInt(m.Data, `"s":`); from != c.id {
		return // another sender's broadcast
	}
	c.mu.Lock()
	c.gotOwn = true
	next := c.gotResp
	c.mu.Unlock()
	if next && (ph == phWarmup || ph == phMeasure) {
		g.sendRequest(c, g.shoutPayload(c))
	}
}

// Connect dials N clients and completes their handshakes, at most Inflight
// at a time, reporting progress through fn every second. It returns when
// every client is ready or has failed.
func (g *Gen) Connect(progress func(ready, failed int64)) {
	n := g.cfg.N
	g.sem = make(chan struct{}, g.cfg.Inflight)
	g.clients = make([]*client, 0, n)
	jobs := make(chan int)
	var wg sync.WaitGroup
	for range min(g.cfg.Inflight, 64) {
		wg.Go(func() {
			for i := range jobs {
				nc, err := g.dial(i + g.cfg.Shard*7)
				if err != nil {
					g.connErr(err)
					g.failed.Add(1)
					<-g.sem
					continue
				}
				c := g.newClient(nc)
				g.pmu.Lock()
				g.pending[c] = struct{}{}
				g.pmu.Unlock()
				g.cmu.Lock()
				c.id = int64(g.cfg.Shard)<<32 | int64(len(g.clients))
				g.clients = append(g.clients, c)
				g.cmu.Unlock()
				if _, err := g.eng.AddConn(nc); err != nil {
					if g.settle(c, false) {
						g.connErr(err)
					}
					nc.Close()
					continue
				}
				if err := c.start(); err != nil {
					c.fail(err)
				}
			}
		})
	}
	stop := make(chan struct{})
	go g.watchPending(stop)
	t := time.NewTicker(time.Second)
	defer t.Stop()
	go func() {
		for i := range n {
			g.sem <- struct{}{}
			jobs <- i
		}
		close(jobs)
	}()
	for g.ready.Load()+g.failed.Load() < int64(n) {
		select {
		case <-t.C:
			if progress != nil {
				progress(g.ready.Load(), g.failed.Load())
			}
		case <-time.After(10 * time.Millisecond):
		}
	}
	close(stop)
	wg.Wait()
}

// watchPending fails clients whose connect+handshake takes too long.
func (g *Gen) watchPending(stop chan struct{}) {
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		now := g.now()
		var late []*client
		g.pmu.Lock()
		for c := range g.pending {
			if time.Duration(now-c.born) > g.cfg.ConnectTimeout {
				late = append(late, c)
			}
		}
		g.pmu.Unlock()
		for _, c := range late {
			if g.settle(c, false) {
				g.connErr(errors.New("handshake timeout"))
			}
			c.nc.Close()
		}
	}
}

// WaitJoined waits until every ready client's join got a response, or timeout.
func (g *Gen) WaitJoined(timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	for g.joined.Load()+g.errResps.Load() < g.ready.Load() && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
}

// Start begins the load (warm-up phase): echo clients send their first
// request, broadcast senders their first broadcast.
func (g *Gen) Start() {
	g.phase.Store(phWarmup)
	g.cmu.Lock()
	cs := append([]*client(nil), g.clients...)
	g.cmu.Unlock()
	switch g.cfg.Mode {
	case ModeEcho:
		for _, c := range cs {
			if c.state.Load() == stReady {
				g.sendRequest(c, []byte(g.cfg.Payload))
			}
		}
		go g.watchRequests()
	case ModeBroadcast:
		n := 0
		for _, c := range cs {
			if n == g.cfg.Senders {
				break
			}
			if c.state.Load() == stReady {
				c.mu.Lock()
				c.sender = true
				c.mu.Unlock()
				n++
				g.sendRequest(c, g.shoutPayload(c))
			}
		}
		go g.watchRequests()
	}
}

// watchRequests gives up on requests without a response after
// RequestTimeout (counted as timeouts) and sends the next one; a broadcast
// sender that waits for its own push too long sends the next broadcast.
func (g *Gen) watchRequests() {
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	for range t.C {
		ph := g.phase.Load()
		if ph != phWarmup && ph != phMeasure {
			return
		}
		now := g.now()
		g.cmu.Lock()
		cs := g.clients
		g.cmu.Unlock()
		for _, c := range cs {
			if c.state.Load() != stReady {
				continue
			}
			c.mu.Lock()
			timedOut := c.sentAt != 0 && time.Duration(now-c.sentAt) > g.cfg.RequestTimeout
			if timedOut {
				c.sentAt = 0
			}
			stalled := c.sender && c.sentAt == 0 && c.gotResp && !c.gotOwn
			c.mu.Unlock()
			switch {
			case timedOut && g.cfg.Mode == ModeEcho:
				g.timeouts.Add(1)
				g.sendRequest(c, []byte(g.cfg.Payload))
			case timedOut || stalled:
				if timedOut {
					g.timeouts.Add(1)
				}
				if c.sender {
					g.sendRequest(c, g.shoutPayload(c))
				}
			}
		}
	}
}

// Measure starts the measurement window: counters and histogram restart.
func (g *Gen) Measure() {
	g.lat.Reset()
	g.resps.Store(0)
	g.pushes.Store(0)
	g.errResps.Store(0)
	g.timeouts.Store(0)
	g.emu.Lock()
	clear(g.errCodes)
	g.emu.Unlock()
	g.measureStart.Store(g.now())
	g.phase.Store(phMeasure)
}

// Result is what a generator reports at the end of a load phase.
type Result struct {
	Counters
	MeasureNS int64         `json:"measureNs"`
	Latency   hist.Snapshot `json:"latency"`
}

// StopLoad ends the measurement window and the load, waits briefly for
// outstanding requests, and returns the result.
func (g *Gen) StopLoad() Result {
	g.measureEnd.Store(g.now())
	g.phase.Store(phStopping)
	r := Result{Counters: g.Counters(), MeasureNS: g.measureEnd.Load() - g.measureStart.Load(), Latency: g.lat.Snapshot()}
	// Let in-flight requests finish so that closing does not look like a failure.
	deadline := time.Now().Add(2 * time.Second)
	for time.Now().Before(deadline) {
		busy := false
		g.cmu.Lock()
		for _, c := range g.clients {
			c.mu.Lock()
			busy = busy || (c.sentAt != 0 && c.state.Load() == stReady)
			c.mu.Unlock()
			if busy {
				break
			}
		}
		g.cmu.Unlock()
		if !busy {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	return r
}

// Counters returns the current counters.
func (g *Gen) Counters() Counters {
	g.emu.Lock()
	defer g.emu.Unlock()
	cp := func(m map[string]int64) map[string]int64 {
		if len(m) == 0 {
			return nil
		}
		o := make(map[string]int64, len(m))
		for k, v := range m {
			o[k] = v
		}
		return o
	}
	return Counters{
		Ready: g.ready.Load(), Failed: g.failed.Load(), ClosedByServer: g.closedByServer.Load(),
		Kicked: g.kicked.Load(), KickReasons: cp(g.kickReasons), HeartbeatsRecv: g.hbRecv.Load(),
		RequestsSent: g.reqSent.Load(), Responses: g.resps.Load(), ErrorResponses: g.errResps.Load(),
		ErrorCodes: cp(g.errCodes), Timeouts: g.timeouts.Load(), Pushes: g.pushes.Load(),
		Joined: g.joined.Load(), Cycles: g.cycles.Load(), ConnectErrors: cp(g.connErrs),
		CloseReasons: cp(g.closeErrs), ProtocolErrors: cp(g.protoErrs), CloseAges: append([]string(nil), g.closeAges...),
	}
}

// CloseAll closes every client connection.
func (g *Gen) CloseAll() {
	g.phase.Store(phStopping)
	g.cmu.Lock()
	cs := g.clients
	g.cmu.Unlock()
	for _, c := range cs {
		c.mu.Lock()
		c.closing = true
		c.mu.Unlock()
		c.nc.Close()
	}
}

// Churn runs Cycles connect/handshake/close cycles on N concurrent workers
// and records each cycle's duration.
func (g *Gen) Churn(progress func(done int64)) {
	var next atomic.Int64
	var wg sync.WaitGroup
	stop := make(chan struct{})
	go func() {
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				if progress != nil {
					progress(g.cycles.Load())
				}
			}
		}
	}()
	for w := range g.cfg.N {
		wg.Go(func() {
			for {
				i := int(next.Add(1)) - 1
				if i >= g.cfg.Cycles {
					return
				}
				start := g.now()
				nc, err := g.dial(i + w)
				if err != nil {
					g.connErr(err)
					g.failed.Add(1)
					continue
				}
				c := g.newClient(nc)
				c.done = make(chan bool, 1)
				if _, err := g.eng.AddConn(nc); err != nil {
					g.connErr(err)
					g.failed.Add(1)
					nc.Close()
					continue
				}
				if err := c.start(); err != nil {
					c.fail(err)
				}
				var ok bool
				select {
				case ok = <-c.done:
				case <-time.After(g.cfg.ConnectTimeout):
				}
				c.mu.Lock()
				timedOut := !ok && !c.closing && c.state.Load() != stClosed
				c.closing = true
				c.mu.Unlock()
				if timedOut {
					g.connErr(errors.New("handshake timeout"))
				}
				nc.Close()
				if ok {
					g.cycles.Add(1)
					g.lat.Record(g.now() - start)
				} else {
					g.failed.Add(1)
				}
			}
		})
	}
	wg.Wait()
	close(stop)
}
