// Package client is a Go client for the nanomesh wire protocol (the
// pomelo/nano protocol) over TCP and WebSocket. Tests, benchmarks, examples
// and bots use it to talk to a nanomesh server like any client SDK would.
//
// Dial connects and completes the protocol handshake, returning a Client with
// Request, Notify and push handlers (On, Pushes). DialRaw returns a Conn at
// the packet layer, without the handshake, for tests of the server's handling
// of misbehaving clients.
//
// A Client runs one read goroutine, which dispatches responses and calls push
// handlers in arrival order, and one heartbeat goroutine. Outgoing messages
// are written whole, in call order.
package client

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/nanomesh/nanomesh/message"
	"github.com/nanomesh/nanomesh/packet"
)

// Client is a connection that completed the protocol handshake. Its methods
// are safe for concurrent use.
type Client struct {
	conn    *Conn
	info    HandshakeInfo
	ser     message.Serializer
	dict    *message.Dictionary // decodes incoming compressed routes
	outDict *message.Dictionary // compresses outgoing routes; nil when disabled
	maxData int

	mu       sync.Mutex
	nextID   uint64
	pending  map[uint64]chan *message.Message
	handlers map[string][]func([]byte)
	chans    []chan []byte
	closing  bool   // Close was called
	kicked   bool   // a Kick packet arrived
	reason   string // its reason
	err      error  // why the connection ended, set before done is closed

	stop chan struct{} // closed when the connection is ending
	done chan struct{} // closed when both goroutines have ended
}

// Dial connects to addr ("tcp://host:port", "ws://host:port/path",
// "wss://host:port/path" or a bare "host:port" for TCP) and completes the
// protocol handshake; see Conn.Handshake. A handshake the server rejects is
// returned as an *Error. ctx bounds the connect and the handshake; it has no
// effect once Dial has returned.
func Dial(ctx context.Context, addr string, opts ...Option) (*Client, error) {
	cfg := newConfig(opts)
	conn, err := dialRaw(ctx, addr, cfg)
	if err != nil {
		return nil, err
	}
	info, err := conn.Handshake(ctx)
	if err != nil {
		conn.Close()
		return nil, err
	}
	dict, err := message.NewDictionary(info.Dict)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("client: handshake: %w: %w", ErrProtocol, err)
	}
	c := &Client{
		conn:     conn,
		info:     info,
		ser:      cfg.serializer,
		dict:     dict,
		maxData:  cfg.maxPacket,
		pending:  make(map[uint64]chan *message.Message),
		handlers: make(map[string][]func([]byte)),
		stop:     make(chan struct{}),
		done:     make(chan struct{}),
	}
	if cfg.compression {
		c.outDict = dict
	}
	if c.ser == nil {
		c.ser = message.JSON
		if info.Serializer == message.Protobuf.Name() {
			c.ser = message.Protobuf
		}
	}
	var hb sync.WaitGroup
	if cfg.heartbeat && info.Heartbeat > 0 {
		hb.Go(c.heartbeat)
	}
	go func() {
		c.readLoop()
		hb.Wait()
		close(c.done)
	}()
	return c, nil
}

// Handshake returns what the server announced in its handshake reply.
func (c *Client) Handshake() HandshakeInfo { return c.info }

// Serializer returns the serializer the client uses for payloads.
func (c *Client) Serializer() message.Serializer { return c.ser }

// LocalAddr returns the local network address of the connection.
func (c *Client) LocalAddr() net.Addr { return c.conn.LocalAddr() }

// RemoteAddr returns the server's network address.
func (c *Client) RemoteAddr() net.Addr { return c.conn.RemoteAddr() }

// Request sends req to route and waits for the response, which it decodes
// into resp. req is encoded with the serializer ([]byte and json.RawMessage
// are sent as is; nil sends an empty payload). resp may be nil (the payload is
// discarded), a *[]byte (which receives a copy of the raw payload) or a value
// the serializer decodes into.
//
// A response with the error flag is returned as an *Error. When ctx is done
// first, Request returns an error wrapping ctx.Err() (a late response is
// dropped). When the connection ends first, it returns an error wrapping
// ErrClosed (and ErrKicked with the reason if the server kicked the client).
func (c *Client) Request(ctx context.Context, route string, req, resp any) error {
	data, err := c.marshal(req)
	if err != nil {
		return fmt.Errorf("client: request %s: %w", route, err)
	}
	ch := make(chan *message.Message, 1)
	c.mu.Lock()
	if c.err != nil || c.closing {
		c.mu.Unlock()
		return fmt.Errorf("client: request %s: %w", route, c.closedErr())
	}
	c.nextID++
	id := c.nextID
	c.pending[id] = ch
	c.mu.Unlock()
	drop := func() {
		c.mu.Lock()
		delete(c.pending, id)
		c.mu.Unlock()
	}
	m := message.Message{Type: message.Request, ID: id, Route: route, Data: data}
	if err := c.send(ctx, &m); err != nil {
		drop()
		return fmt.Errorf("client: request %s: %w", route, err)
	}
	select {
	case r := <-ch:
		return c.decodeResponse(route, r, resp)
	case <-ctx.Done():
		drop()
		return fmt.Errorf("client: request %s: %w", route, ctx.Err())
	case <-c.stop:
		drop()
		select {
		case r := <-ch: // the response arrived just before the end
			return c.decodeResponse(route, r, resp)
		default:
		}
		return fmt.Errorf("client: request %s: %w", route, c.closedErr())
	}
}

func (c *Client) decodeResponse(route string, r *message.Message, resp any) error {
	if r.Error {
		return decodeError(r.Data)
	}
	if resp == nil {
		return nil
	}
	if err := c.ser.Unmarshal(r.Data, resp); err != nil {
		return fmt.Errorf("client: request %s: decode response: %w", route, err)
	}
	return nil
}

// Notify sends v to route without waiting for any reply. v is encoded like a
// Request's req. ctx bounds the write.
func (c *Client) Notify(ctx context.Context, route string, v any) error {
	data, err := c.marshal(v)
	if err != nil {
		return fmt.Errorf("client: notify %s: %w", route, err)
	}
	m := message.Message{Type: message.Notify, Route: route, Data: data}
	if err := c.send(ctx, &m); err != nil {
		return fmt.Errorf("client: notify %s: %w", route, err)
	}
	return nil
}

func (c *Client) marshal(v any) ([]byte, error) {
	if v == nil {
		return nil, nil
	}
	return c.ser.Marshal(v)
}

func (c *Client) send(ctx context.Context, m *message.Message) error {
	select {
	case <-c.stop:
		return c.closedErr()
	default:
	}
	err := c.conn.write(ctx, func(dst []byte) ([]byte, error) {
		start := len(dst)
		dst = append(dst, 0, 0, 0, 0)
		dst, err := message.Append(dst, m, c.outDict)
		if err != nil {
			return dst[:start], err
		}
		n := len(dst) - start - packet.HeaderLen
		if n > packet.MaxBodyLen {
			return dst[:start], fmt.Errorf("%w: %d bytes", packet.ErrTooLarge, n)
		}
		packet.PutHeader(dst[start:], packet.Data, n)
		return dst, nil
	})
	if errors.Is(err, ErrClosed) {
		// The server may have kicked us and closed: let the read loop take
		// the Kick it sent before this error ends the connection.
		select {
		case <-c.done:
		case <-time.After(time.Second):
		}
		c.shutdown(err)
		return c.closedErr()
	}
	return err
}

// On registers fn to be called with the payload of every push on route.
// Handlers run on the client's read goroutine, in arrival order, and delay
// the processing of later messages while they run. Several handlers of one
// route run in registration order and share data, which is not reused by
// the client. A handler may call any method of the client, including Close,
// but must not wait for a Request's response.
func (c *Client) On(route string, fn func(data []byte)) {
	c.mu.Lock()
	c.handlers[route] = append(c.handlers[route], fn)
	c.mu.Unlock()
}

// Pushes returns a channel that receives a copy of the payload of every push
// on route, with the given buffer size. When the buffer is full the read
// goroutine waits for the receiver, so that no push is lost. The channel is
// closed when the connection ends.
func (c *Client) Pushes(route string, buffer int) <-chan []byte {
	ch := make(chan []byte, buffer)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		close(ch)
		return ch
	}
	c.chans = append(c.chans, ch)
	c.handlers[route] = append(c.handlers[route], func(data []byte) {
		select {
		case ch <- append([]byte(nil), data...):
		case <-c.stop:
		}
	})
	return ch
}

// Kicked reports whether the server kicked the client, and with what reason.
func (c *Client) Kicked() (reason string, ok bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.reason, c.kicked
}

// Done returns a channel that is closed when the connection has ended and
// the client's goroutines have finished; Err then says why.
func (c *Client) Done() <-chan struct{} { return c.done }

// Err returns nil while the connection is up, and afterwards the reason it
// ended, an error wrapping ErrClosed: a local Close (ErrClosed itself), a kick
// (also wrapping ErrKicked, with the reason), the end of the stream (io.EOF),
// a WebSocket close frame (*CloseError), a protocol error (ErrProtocol) or a
// network error.
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Close closes the connection. Pending requests fail with ErrClosed. It does
// not wait for the client's goroutines; receive from Done for that. Close is
// idempotent and returns nil.
func (c *Client) Close() error {
	c.mu.Lock()
	c.closing = true
	c.mu.Unlock()
	c.shutdown(ErrClosed)
	return nil
}

// WriteRaw sends b as is on the connection (as one binary frame over
// WebSocket), for tests of the server's handling of invalid input. It is
// ordered with the client's other writes.
func (c *Client) WriteRaw(b []byte) error { return c.conn.WriteRaw(b) }

// closedErr returns the error for an operation on a closed client.
func (c *Client) closedErr() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return c.err
	}
	return ErrClosed
}

// shutdown records why the connection ends (the first reason wins, a kick
// wins over the rest), stops the goroutines and closes the connection.
func (c *Client) shutdown(reason error) {
	c.mu.Lock()
	if c.kicked {
		reason = kickError(c.reason)
	}
	first := c.err == nil
	if first {
		c.err = reason
	}
	c.mu.Unlock()
	if first {
		close(c.stop)
		c.conn.Close()
	}
}

func (c *Client) readLoop() {
	var err error
	for err == nil {
		var t packet.Type
		var body []byte
		t, body, err = c.conn.ReadPacket(context.Background())
		if err != nil {
			break
		}
		err = c.handlePacket(t, body)
	}
	c.mu.Lock()
	closing := c.closing
	c.mu.Unlock()
	switch {
	case closing:
		err = ErrClosed
	case errors.Is(err, ErrClosed):
	default:
		err = fmt.Errorf("%w: %w", ErrClosed, err)
	}
	c.shutdown(err)
	c.mu.Lock()
	chans := c.chans
	c.chans = nil
	c.mu.Unlock()
	for _, ch := range chans {
		close(ch)
	}
}

func (c *Client) handlePacket(t packet.Type, body []byte) error {
	switch t {
	case packet.Heartbeat:
		return nil
	case packet.Kick:
		reason := kickReason(body)
		c.mu.Lock()
		c.kicked, c.reason = true, reason
		c.mu.Unlock()
		return kickError(reason)
	case packet.Data:
	default:
		return fmt.Errorf("%w: unexpected %s packet", ErrProtocol, t)
	}
	m := new(message.Message)
	if err := message.Decode(body, m, c.dict, c.maxData); err != nil {
		return fmt.Errorf("%w: %w", ErrProtocol, err)
	}
	switch m.Type {
	case message.Response:
		c.mu.Lock()
		ch := c.pending[m.ID]
		delete(c.pending, m.ID)
		c.mu.Unlock()
		if ch != nil {
			ch <- m
		}
	case message.Push:
		c.mu.Lock()
		hs := c.handlers[m.Route]
		c.mu.Unlock()
		for _, h := range hs {
			h(m.Data)
		}
	default:
		return fmt.Errorf("%w: unexpected %s message from server", ErrProtocol, m.Type)
	}
	return nil
}

func (c *Client) heartbeat() {
	t := time.NewTicker(c.info.Heartbeat)
	defer t.Stop()
	for {
		select {
		case <-c.stop:
			return
		case <-t.C:
			if err := c.conn.writePacket(context.Background(), packet.Heartbeat, nil); err != nil {
				c.shutdown(fmt.Errorf("%w: heartbeat: %w", ErrClosed, err))
				return
			}
		}
	}
}
