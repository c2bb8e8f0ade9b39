package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lesismal/nbio"
	"github.com/lesismal/nbio/nbhttp/websocket"
	"github.com/nanomesh/nanomesh/message"
	"github.com/nanomesh/nanomesh/packet"
	"github.com/nanomesh/nanomesh/session"
)

// Connection states.
const (
	stHandshake int32 = iota // waiting for the client's Handshake
	stAwaitAck               // handshake reply sent, waiting for HandshakeAck
	stWorking                // session established
	stClosed
)

// Close reasons sent in Kick packets and reported in logs.
const (
	ReasonShutdown          = "shutdown"
	ReasonHeartbeatTimeout  = "heartbeat timeout"
	ReasonHandshakeTimeout  = "handshake timeout"
	ReasonTooLarge          = "packet too large"
	ReasonBadPacket         = "malformed packet"
	ReasonBeforeHandshake   = "data before handshake"
	ReasonSlowConsumer      = "slow consumer"
	ReasonTooManyPending    = "too many pending messages"
	ReasonHandshakeRejected = "handshake rejected"
)

// errClosed is returned by writes to a closed connection.
var errClosed = errors.New("agent: connection closed")

// conn is one client connection: a raw TCP nbio.Conn or a WebSocket over one.
// It implements session.Entity. Everything per connection lives here (plus
// nbio's own Conn): no goroutine, timer or read buffer of its own.
type conn struct {
	srv   *Server
	nbc   *nbio.Conn      // raw TCP, or nil
	ws    *websocket.Conn // WebSocket, or nil
	state atomic.Int32
	// lastRecv is when (unix nanos) the client last sent anything.
	lastRecv atomic.Int64
	created  int64
	reason   atomic.Pointer[string] // why the server closed it, if it did

	dec        packet.Decoder // touched only by the event loop
	sess       session.Session
	prev, next *conn // wheel list, guarded by wheel.mu
	slot       int
}

func (c *conn) RemoteAddr() net.Addr {
	if c.ws != nil {
		return c.ws.RemoteAddr()
	}
	return c.nbc.RemoteAddr()
}

// writeBufs holds encode buffers; nbio copies what it cannot write at once,
// so a buffer is reused as soon as the write returns.
var writeBufs = sync.Pool{New: func() any { b := make([]byte, 0, 512); return &b }}

func (c *conn) writePacket(t packet.Type, body []byte) error {
	pb := writeBufs.Get().(*[]byte)
	b, err := packet.Append((*pb)[:0], t, body)
	if err == nil {
		err = c.write(b)
	}
	*pb = b[:0]
	writeBufs.Put(pb)
	return err
}

func (c *conn) write(b []byte) error {
	if c.state.Load() == stClosed {
		return errClosed
	}
	var err error
	if c.ws != nil {
		err = c.ws.WriteMessage(websocket.BinaryMessage, b)
	} else {
		_, err = c.nbc.Write(b)
	}
	if err != nil {
		// nbio refuses a write beyond the backlog limit and closes the
		// connection; anything else also ends it.
		c.setReason(ReasonSlowConsumer)
		c.closeNow()
		return fmt.Errorf("agent: write: %w", err)
	}
	return nil
}

func (c *conn) writeMessage(m *message.Message) error {
	if c.srv.opts.outbound != nil {
		if err := c.srv.opts.outbound(&c.sess, m); err != nil {
			return err
		}
	}
	pb := writeBufs.Get().(*[]byte)
	b := append((*pb)[:0], 0, 0, 0, 0)
	b, err := message.Append(b, m, c.srv.opts.dict)
	if err == nil {
		if n := len(b) - packet.HeaderLen; n > packet.MaxBodyLen {
			err = fmt.Errorf("%w: %d bytes", packet.ErrTooLarge, n)
		} else {
			packet.PutHeader(b, packet.Data, n)
			err = c.write(b)
		}
	}
	*pb = b[:0]
	writeBufs.Put(pb)
	return err
}

// Push implements session.Entity.
func (c *conn) Push(route string, data []byte) error {
	return c.writeMessage(&message.Message{Type: message.Push, Route: route, Data: data})
}

// Response implements session.Entity.
func (c *conn) Response(mid uint64, data []byte, isError bool) error {
	return c.writeMessage(&message.Message{Type: message.Response, ID: mid, Data: data, Error: isError})
}

// Kick implements session.Entity.
func (c *conn) Kick(reason string) error {
	c.kick(reason)
	return nil
}

// Close implements session.Entity.
func (c *conn) Close() error {
	c.closeNow()
	return nil
}

func (c *conn) setReason(r string) { c.reason.CompareAndSwap(nil, &r) }

// kick sends a Kick packet with reason, then closes the connection.
func (c *conn) kick(reason string) {
	c.setReason(reason)
	if c.state.Load() != stClosed {
		body, _ := json.Marshal(struct {
			Reason string `json:"reason"`
		}{reason})
		_ = c.writePacket(packet.Kick, body)
	}
	c.closeNow()
}

func (c *conn) closeNow() {
	if c.ws != nil {
		_ = c.ws.Close()
	} else {
		_ = c.nbc.Close()
	}
}

// onData runs on the event loop for every chunk read from the client.
func (c *conn) onData(data []byte) {
	// The real time, not the wheel's clock: that lags by up to a tick, which
	// made a client silent for just over 2 x heartbeat - tick look silent
	// for more than 2 x heartbeat (with a 1 s heartbeat and tick, kicks
	// after 1.5 s of silence, and of clients heartbeating on time).
	c.lastRecv.Store(time.Now().UnixNano())
	if err := c.dec.Feed(data, c.onPacket); err != nil {
		var reason string
		switch {
		case errors.Is(err, packet.ErrTooLarge):
			reason = ReasonTooLarge
		case errors.Is(err, packet.ErrWrongType):
			reason = ReasonBadPacket
		case errors.Is(err, errKick):
			return // already kicked
		default:
			reason = err.Error()
		}
		c.srv.opts.log.Debug().Err(err).Stringer("remote", c.RemoteAddr()).Msg("closing client")
		c.kick(reason)
	}
}

// errKick stops decoding after the connection has been kicked.
var errKick = errors.New("agent: kicked")

func (c *conn) fail(reason string) error {
	c.kick(reason)
	return errKick
}

func (c *conn) onPacket(t packet.Type, body []byte) error {
	switch c.state.Load() {
	case stHandshake:
		if t != packet.Handshake {
			return c.fail(ReasonBeforeHandshake)
		}
		return c.handshake(body)
	case stAwaitAck:
		switch t {
		case packet.HandshakeAck:
			return c.established()
		case packet.Heartbeat:
			return nil
		}
		return c.fail(ReasonBeforeHandshake)
	case stWorking:
		switch t {
		case packet.Data:
			return c.onMessage(body)
		case packet.Heartbeat, packet.HandshakeAck:
			return nil
		}
		return c.fail(ReasonBadPacket)
	}
	return errKick
}

func (c *conn) handshake(body []byte) error {
	srv := c.srv
	var hs Handshake
	if len(body) > 0 {
		if err := json.Unmarshal(body, &hs); err != nil {
			c.refuse(message.CodeBadRequest, "malformed handshake")
			return errKick
		}
	}
	if srv.opts.validator != nil {
		hs.RemoteAddr = c.RemoteAddr()
		if err := srv.opts.validator(&hs); err != nil {
			var me *message.Error
			if errors.As(err, &me) {
				c.refuse(me.Code, me.Message)
			} else {
				c.refuse(message.CodeUnauthorized, err.Error())
			}
			return errKick
		}
	}
	if !c.state.CompareAndSwap(stHandshake, stAwaitAck) {
		return errKick
	}
	if err := c.writePacket(packet.Handshake, srv.handshakeReply()); err != nil {
		return errKick
	}
	return nil
}

func (c *conn) refuse(code int, msg string) {
	body, _ := json.Marshal(message.Error{Code: code, Message: msg})
	c.setReason(ReasonHandshakeRejected)
	_ = c.writePacket(packet.Handshake, body)
	c.closeNow()
}

func (c *conn) established() error {
	srv := c.srv
	c.sess.Init(srv.opts.ids(), c, srv.opts.ser)
	if !c.state.CompareAndSwap(stAwaitAck, stWorking) || !srv.wheel.promote(c) {
		return errKick
	}
	if c.ws != nil {
		// nbio arms the HTTP phase's read deadline (KeepaliveTime) after
		// handing the connection to a poller, so it can land after the
		// upgrade cleared it and close the session later: clear it again.
		// Liveness is the wheel's job.
		_ = c.ws.SetReadDeadline(time.Time{})
	}
	srv.sessions.put(c)
	srv.handler.OnSession(&c.sess)
	return nil
}

func (c *conn) onMessage(body []byte) error {
	var m message.Message
	if err := message.Decode(body, &m, c.srv.opts.dict, c.srv.opts.maxPacket); err != nil {
		if errors.Is(err, message.ErrTooLarge) {
			return c.fail(ReasonTooLarge)
		}
		return c.fail(ReasonBadPacket)
	}
	if m.Type != message.Request && m.Type != message.Notify {
		return c.fail(ReasonBadPacket)
	}
	if err := c.srv.handler.OnMessage(&c.sess, &m); err != nil {
		if errors.Is(err, session.ErrQueueFull) {
			return c.fail(ReasonTooManyPending)
		}
		return c.fail(err.Error())
	}
	return nil
}

// closed runs once when the connection has ended, whoever closed it.
func (c *conn) closed(err error) {
	prev := c.state.Swap(stClosed)
	if prev == stClosed {
		return
	}
	srv := c.srv
	srv.wheel.remove(c)
	if prev == stWorking {
		srv.sessions.del(c)
		srv.handler.OnClose(&c.sess)
		c.sess.Release()
	}
	srv.count.Add(-1)
	if r := c.reason.Load(); r != nil {
		srv.opts.log.Debug().Str("reason", *r).Stringer("remote", c.RemoteAddr()).Msg("client closed by server")
	} else if err != nil {
		// Neither the client's EOF nor one of our reasons: e.g. a deadline
		// nbio armed itself (see established).
		srv.opts.log.Debug().Err(err).Stringer("remote", c.RemoteAddr()).Msg("connection closed")
	}
}

// visit is the wheel's per-connection check.
func (c *conn) visit(now int64, pending bool) {
	srv := c.srv
	if pending {
		if time.Duration(now-c.created) > srv.opts.handshakeTimeout {
			c.kick(ReasonHandshakeTimeout)
		}
		return
	}
	if time.Duration(now-c.lastRecv.Load()) > 2*srv.opts.heartbeat {
		c.kick(ReasonHeartbeatTimeout)
		return
	}
	_ = c.writePacket(packet.Heartbeat, nil)
}
