package client

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/nanomesh/nanomesh/packet"
)

// Conn is a connection to a server at the packet layer, without the protocol
// handshake: DialRaw returns it after the TCP connect (and TLS handshake) or
// after the WebSocket upgrade. Server tests use it to send data before the
// handshake, garbage or oversized packets and to read a Kick packet; Client
// is built on it.
//
// Writes (WritePacket, WriteRaw) are safe for concurrent use and are sent
// whole, in call order. ReadPacket must not be called concurrently with
// itself.
type Conn struct {
	nc  net.Conn
	cfg *config
	ws  *wsReader // nil for TCP

	// Read side, owned by the single reader.
	dec    *packet.Decoder
	rbuf   []byte
	queue  []rawPacket
	rerr   error // sticky read error, returned once the queue is drained
	rguard deadlineGuard

	// Write side, under wmu.
	wmu    sync.Mutex
	wbuf   []byte
	wguard deadlineGuard
	werr   error // sticky: a partial write leaves the stream unusable

	closeOnce sync.Once
	closeErr  error
}

type rawPacket struct {
	t    packet.Type
	body []byte
}

// DialRaw connects to addr without the protocol handshake. addr is
// "tcp://host:port", "ws://host:port/path", "wss://host:port/path" or a bare
// "host:port" (TCP). For WebSocket addresses DialRaw completes the HTTP
// upgrade and checks Sec-WebSocket-Accept. ctx bounds the connect and the
// upgrade; it has no effect once DialRaw has returned. Of the options, those
// about the transport (WithDialer, WithLocalAddr, WithTLS, WithHeader,
// WithMaxPacket) apply, and WithUser applies to Conn.Handshake.
func DialRaw(ctx context.Context, addr string, opts ...Option) (*Conn, error) {
	return dialRaw(ctx, addr, newConfig(opts))
}

func dialRaw(ctx context.Context, addr string, cfg *config) (*Conn, error) {
	scheme, host, path, err := parseAddr(addr)
	if err != nil {
		return nil, err
	}
	var d net.Dialer
	if cfg.dialer != nil {
		d = *cfg.dialer
	}
	if cfg.localAddr != nil {
		d.LocalAddr = cfg.localAddr
	}
	nc, err := d.DialContext(ctx, "tcp", host)
	if err != nil {
		return nil, fmt.Errorf("client: dial %s: %w", addr, err)
	}
	c := &Conn{nc: nc, cfg: cfg, dec: packet.NewDecoder(cfg.maxPacket)}
	fail := func(err error) (*Conn, error) {
		nc.Close()
		return nil, fmt.Errorf("client: dial %s: %w", addr, err)
	}
	if scheme == "wss" || (scheme == "tcp" && cfg.tls != nil) {
		tc := cfg.tls
		if tc == nil {
			tc = &tls.Config{}
		}
		if tc.ServerName == "" && !tc.InsecureSkipVerify {
			tc = tc.Clone()
			tc.ServerName, _, _ = net.SplitHostPort(host)
		}
		tlsConn := tls.Client(nc, tc)
		if err := tlsConn.HandshakeContext(ctx); err != nil {
			return fail(err)
		}
		c.nc = tlsConn
	}
	if scheme == "ws" || scheme == "wss" {
		err := c.interruptible(ctx, &c.rguard, c.nc.SetDeadline, func() error {
			br, err := wsUpgrade(c.nc, host, path, cfg.header)
			if err == nil {
				c.ws = &wsReader{br: br, conn: c}
			}
			return err
		})
		if err != nil {
			return fail(err)
		}
	} else {
		c.rbuf = make([]byte, 4096)
	}
	return c, nil
}

func parseAddr(addr string) (scheme, host, path string, err error) {
	if !strings.Contains(addr, "://") {
		return "tcp", addr, "", nil
	}
	u, err := url.Parse(addr)
	if err != nil {
		return "", "", "", fmt.Errorf("client: bad address %q: %w", addr, err)
	}
	scheme, host = strings.ToLower(u.Scheme), u.Host
	switch scheme {
	case "tcp":
	case "ws", "wss":
		path = u.RequestURI()
		if u.Hostname() == "" {
			return "", "", "", fmt.Errorf("client: bad address %q: no host", addr)
		}
		if _, _, err := net.SplitHostPort(host); err != nil {
			port := "80"
			if scheme == "wss" {
				port = "443"
			}
			host = net.JoinHostPort(u.Hostname(), port)
		}
	default:
		return "", "", "", fmt.Errorf("client: bad address %q: scheme must be tcp, ws or wss", addr)
	}
	if host == "" {
		return "", "", "", fmt.Errorf("client: bad address %q: no host", addr)
	}
	return scheme, host, path, nil
}

// LocalAddr returns the local network address of the connection.
func (c *Conn) LocalAddr() net.Addr { return c.nc.LocalAddr() }

// RemoteAddr returns the server's network address.
func (c *Conn) RemoteAddr() net.Addr { return c.nc.RemoteAddr() }

// WebSocket reports whether the connection is a WebSocket connection.
func (c *Conn) WebSocket() bool { return c.ws != nil }

// ReadPacket returns the next packet from the server. The body is a copy
// owned by the caller (nil when empty). It returns the ctx error, wrapped,
// when ctx is done first; the connection stays usable after that. At the end
// of the stream it returns io.EOF (io.ErrUnexpectedEOF inside a packet); a
// packet the decoder rejects (unknown type, oversized body) is reported as
// an error wrapping ErrProtocol and the packet package's error, and all
// later calls fail the same way. Packets received before an error are
// returned first.
func (c *Conn) ReadPacket(ctx context.Context) (packet.Type, []byte, error) {
	for len(c.queue) == 0 {
		if c.rerr != nil {
			return 0, nil, c.rerr
		}
		if err := ctx.Err(); err != nil {
			return 0, nil, fmt.Errorf("client: read packet: %w", err)
		}
		err := c.interruptible(ctx, &c.rguard, c.nc.SetReadDeadline, c.fill)
		if err != nil && !isCtxErr(ctx, err) {
			c.rerr = err
		} else if err != nil && len(c.queue) == 0 {
			return 0, nil, fmt.Errorf("client: read packet: %w", err)
		}
	}
	p := c.queue[0]
	c.queue[0] = rawPacket{}
	c.queue = c.queue[1:]
	if len(c.queue) == 0 {
		c.queue = c.queue[:0:0]
	}
	return p.t, p.body, nil
}

// fill reads one chunk of the stream and feeds it to the decoder.
func (c *Conn) fill() error {
	var n int
	var err error
	if c.ws != nil {
		var chunk []byte
		chunk, err = c.ws.next()
		n = len(chunk)
		if n > 0 {
			err = errors.Join(err, c.feed(chunk))
		}
	} else {
		n, err = c.nc.Read(c.rbuf)
		if n > 0 {
			err = errors.Join(err, c.feed(c.rbuf[:n]))
		}
	}
	if errors.Is(err, io.EOF) && c.dec.Buffered() > 0 {
		err = io.ErrUnexpectedEOF
	}
	return err
}

func (c *Conn) feed(chunk []byte) error {
	err := c.dec.Feed(chunk, func(t packet.Type, body []byte) error {
		var b []byte
		if len(body) > 0 {
			b = append([]byte(nil), body...)
		}
		c.queue = append(c.queue, rawPacket{t, b})
		return nil
	})
	if err != nil {
		return fmt.Errorf("%w: %w", ErrProtocol, err)
	}
	return nil
}

// WritePacket sends one packet. Over WebSocket it is sent as one binary
// frame. An error leaves the connection unusable if part of the packet was
// written.
func (c *Conn) WritePacket(t packet.Type, body []byte) error {
	return c.writePacket(context.Background(), t, body)
}

// WriteRaw sends b as is: on the TCP stream, or as one binary WebSocket frame.
// It is meant for tests of the server's handling of invalid input.
func (c *Conn) WriteRaw(b []byte) error {
	return c.write(context.Background(), func(dst []byte) ([]byte, error) {
		return append(dst, b...), nil
	})
}

func (c *Conn) writePacket(ctx context.Context, t packet.Type, body []byte) error {
	return c.write(ctx, func(dst []byte) ([]byte, error) {
		return packet.Append(dst, t, body)
	})
}

// write sends the bytes that build appends, as one frame over WebSocket,
// under the write lock. An interrupted write that sent part of the data
// leaves the stream unusable: the connection is closed.
func (c *Conn) write(ctx context.Context, build func([]byte) ([]byte, error)) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.werr != nil {
		return c.werr
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("client: write: %w", err)
	}
	var err error
	var out []byte
	if c.ws != nil {
		out, err = wsAppendFrame(c.wbuf[:0], opBinary, build)
	} else {
		out, err = build(c.wbuf[:0])
	}
	if err != nil {
		return fmt.Errorf("client: write: %w", err)
	}
	if cap(out) <= 64<<10 {
		c.wbuf = out[:0]
	}
	n := 0
	err = c.interruptible(ctx, &c.wguard, c.nc.SetWriteDeadline, func() error {
		var err error
		n, err = c.nc.Write(out)
		return err
	})
	if err != nil {
		if n > 0 || !isCtxErr(ctx, err) {
			c.werr = fmt.Errorf("%w: write: %w", ErrClosed, err)
			c.nc.Close()
			return c.werr
		}
		return fmt.Errorf("client: write: %w", err)
	}
	return nil
}

// writeControl sends a WebSocket control frame (pong, close).
func (c *Conn) writeControl(op byte, payload []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return c.writeControlLocked(op, payload)
}

func (c *Conn) writeControlLocked(op byte, payload []byte) error {
	if c.werr != nil {
		return c.werr
	}
	out, _ := wsAppendFrame(nil, op, func(dst []byte) ([]byte, error) {
		return append(dst, payload...), nil
	})
	if _, err := c.nc.Write(out); err != nil {
		c.werr = fmt.Errorf("%w: write: %w", ErrClosed, err)
		return err
	}
	if op == opClose {
		c.werr = ErrClosed
	}
	return nil
}

// Close closes the connection. Over WebSocket it first sends a close frame
// (status 1000), after any write in progress, which is given at most a
// second to complete. Close is idempotent.
func (c *Conn) Close() error {
	c.closeOnce.Do(func() {
		if c.ws != nil {
			c.nc.SetWriteDeadline(time.Now().Add(time.Second))
			c.wmu.Lock()
			c.nc.SetWriteDeadline(time.Now().Add(time.Second))
			c.writeControlLocked(opClose, []byte{0x03, 0xe8})
			c.wmu.Unlock()
		}
		c.closeErr = c.nc.Close()
	})
	return c.closeErr
}

// deadlineGuard lets a context cancellation interrupt a blocking read or write
// through a past deadline, without the cancellation leaking into a later call:
// each call has its own token, and a late cancellation callback of an earlier
// call sees that its token is no longer current.
type deadlineGuard struct {
	mu   sync.Mutex
	cur  uint64 // token of the call in progress, 0 if none
	last uint64
}

var past = time.Unix(1, 0)

// interruptible runs fn with the deadline of ctx applied through set, and
// makes cancellation of ctx interrupt fn by setting a past deadline. The
// deadline is cleared when fn returns. A deadline error caused by ctx is
// replaced by the ctx error.
func (c *Conn) interruptible(ctx context.Context, g *deadlineGuard, set func(time.Time) error, fn func() error) error {
	if ctx.Done() == nil {
		return fn()
	}
	dl, _ := ctx.Deadline()
	g.mu.Lock()
	g.last++
	token := g.last
	g.cur = token
	set(dl)
	g.mu.Unlock()
	stop := context.AfterFunc(ctx, func() {
		g.mu.Lock()
		if g.cur == token {
			set(past)
		}
		g.mu.Unlock()
	})
	err := fn()
	stop()
	g.mu.Lock()
	g.cur = 0
	set(time.Time{})
	g.mu.Unlock()
	if err != nil && errors.Is(err, os.ErrDeadlineExceeded) {
		// Only ctx sets deadlines; if ctx's deadline has just passed, its
		// Done channel is about to close.
		<-ctx.Done()
		return ctx.Err()
	}
	return err
}

func isCtxErr(ctx context.Context, err error) bool {
	return ctx.Err() != nil && (errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded))
}

// HandshakeInfo is what the server announced in its handshake reply.
type HandshakeInfo struct {
	// Code is the reply's code, 200 for an accepted handshake.
	Code int
	// Heartbeat is the heartbeat interval; 0 if the server announced none.
	Heartbeat time.Duration
	// ServerTime is the server's time of the handshake (second precision),
	// the zero Time if not announced.
	ServerTime time.Time
	// Serializer is the name of the server's serializer, such as "json".
	Serializer string
	// Dict is the route dictionary (route to code), nil if none was sent.
	Dict map[string]uint16
	// Raw is the reply's JSON body as received.
	Raw json.RawMessage
}

type handshakeReply struct {
	Code    int    `json:"code"`
	Message string `json:"message"`
	Sys     struct {
		Heartbeat  float64           `json:"heartbeat"`
		ServerTime int64             `json:"servertime"`
		Serializer string            `json:"serializer"`
		Dict       map[string]uint16 `json:"dict"`
	} `json:"sys"`
}

// Handshake performs the protocol handshake: it sends the Handshake packet
// {"sys":{"type":"go","version":"nanomesh"},"user":<WithUser>}, reads the
// server's reply and, if its code is 200, sends the HandshakeAck. A reply with
// another code is returned as an *Error and the connection is closed; so is a
// Kick packet (as an error wrapping ErrKicked). Heartbeats before the reply
// are skipped. ctx bounds the whole exchange.
func (c *Conn) Handshake(ctx context.Context) (HandshakeInfo, error) {
	var info HandshakeInfo
	req := struct {
		Sys struct {
			Type    string `json:"type"`
			Version string `json:"version"`
		} `json:"sys"`
		User any `json:"user,omitempty"`
	}{User: c.cfg.user}
	req.Sys.Type, req.Sys.Version = "go", "nanomesh"
	body, err := json.Marshal(req)
	if err != nil {
		return info, fmt.Errorf("client: handshake user data: %w", err)
	}
	if err := c.writePacket(ctx, packet.Handshake, body); err != nil {
		return info, fmt.Errorf("client: handshake: %w", err)
	}
	for {
		t, body, err := c.ReadPacket(ctx)
		if err != nil {
			return info, fmt.Errorf("client: handshake: %w", err)
		}
		switch t {
		case packet.Heartbeat:
			continue
		case packet.Kick:
			c.Close()
			return info, fmt.Errorf("client: handshake: %w", kickError(kickReason(body)))
		case packet.Handshake:
		default:
			c.Close()
			return info, fmt.Errorf("client: handshake: %w: unexpected %s packet", ErrProtocol, t)
		}
		var r handshakeReply
		if err := json.Unmarshal(body, &r); err != nil {
			c.Close()
			return info, fmt.Errorf("client: handshake: %w: reply: %w", ErrProtocol, err)
		}
		info.Code = r.Code
		if r.Code != 200 {
			c.Close()
			return info, &Error{Code: r.Code, Message: r.Message}
		}
		info.Heartbeat = time.Duration(r.Sys.Heartbeat * float64(time.Second))
		if r.Sys.ServerTime != 0 {
			info.ServerTime = time.Unix(r.Sys.ServerTime, 0)
		}
		info.Serializer = r.Sys.Serializer
		info.Dict = r.Sys.Dict
		info.Raw = body
		break
	}
	if err := c.writePacket(ctx, packet.HandshakeAck, nil); err != nil {
		return info, fmt.Errorf("client: handshake ack: %w", err)
	}
	return info, nil
}

func kickReason(body []byte) string {
	var k struct {
		Reason string `json:"reason"`
	}
	if json.Unmarshal(body, &k) != nil {
		return string(body)
	}
	return k.Reason
}

func kickError(reason string) error {
	return fmt.Errorf("%w (%w: %q)", ErrClosed, ErrKicked, reason)
}
