package agent

import (
	"encoding/json"
	"net"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/nanomesh/nanomesh/message"
	"github.com/nanomesh/nanomesh/packet"
	"github.com/nanomesh/nanomesh/session"
	"github.com/rs/zerolog"
)

// Handshake is what a client sent in its handshake, for a validator to judge.
type Handshake struct {
	Sys        json.RawMessage `json:"sys,omitempty"`
	User       json.RawMessage `json:"user,omitempty"`
	RemoteAddr net.Addr        `json:"-"`
}

// Validator judges a client's handshake. A non-nil error refuses the client:
// the server replies {"code":..,"message":..} (the code of a *message.Error,
// 401 otherwise) and closes the connection.
type Validator func(h *Handshake) error

// Option configures a Server.
type Option func(*options)

type options struct {
	tcpAddr, wsAddr   string
	tcpLn             net.Listener
	wsPath            string
	checkOrigin       func(*http.Request) bool
	certFile, keyFile string
	mux               *http.ServeMux
	heartbeat         time.Duration
	handshakeTimeout  time.Duration
	tick              time.Duration
	maxPacket         int
	writeBacklog      int
	dict              *message.Dictionary
	ser               message.Serializer
	validator         Validator
	outbound          func(*session.Session, *message.Message) error
	ids               func() int64
	log               zerolog.Logger
	pollers           int
}

func defaults() options {
	return options{
		wsPath:           "/nano",
		heartbeat:        30 * time.Second,
		handshakeTimeout: 10 * time.Second,
		tick:             time.Second,
		maxPacket:        packet.DefaultMaxBody,
		writeBacklog:     256 << 10,
		ser:              message.JSON,
		log:              zerolog.Nop(),
		checkOrigin:      func(*http.Request) bool { return true },
		ids:              counter(),
	}
}

func counter() func() int64 {
	var n atomic.Int64
	return func() int64 { return n.Add(1) }
}

// WithTCP serves raw TCP clients on addr ("127.0.0.1:0" picks a port; see Server.TCPAddr).
func WithTCP(addr string) Option { return func(o *options) { o.tcpAddr = addr } }

// WithTCPListener serves raw TCP clients on an existing listener.
func WithTCPListener(ln net.Listener) Option { return func(o *options) { o.tcpLn = ln } }

// WithWS serves WebSocket clients (and any WithHTTP handlers) on addr.
func WithWS(addr string) Option { return func(o *options) { o.wsAddr = addr } }

// WithWSPath sets the WebSocket upgrade path (default "/nano").
func WithWSPath(path string) Option { return func(o *options) { o.wsPath = path } }

// WithCheckOrigin sets the WebSocket origin check. The default accepts every
// origin, as nano does, so that pages served elsewhere can connect.
func WithCheckOrigin(fn func(*http.Request) bool) Option {
	return func(o *options) { o.checkOrigin = fn }
}

// WithTLS serves WebSocket over TLS (wss) with the PEM certificate and key
// files given.
func WithTLS(certFile, keyFile string) Option {
	return func(o *options) { o.certFile, o.keyFile = certFile, keyFile }
}

// WithHTTP serves h at pattern on the WebSocket address, beside the upgrade path.
func WithHTTP(pattern string, h http.Handler) Option {
	return func(o *options) {
		if o.mux == nil {
			o.mux = http.NewServeMux()
		}
		o.mux.Handle(pattern, h)
	}
}

// WithHeartbeat sets the heartbeat interval announced in the handshake
// (default 30 s, whole seconds, at least 1 s). A client silent for more than
// twice the interval is closed.
func WithHeartbeat(d time.Duration) Option {
	return func(o *options) { o.heartbeat = max(d.Truncate(time.Second), time.Second) }
}

// WithHandshakeTimeout sets how long a client may take to complete the
// handshake (default 10 s).
func WithHandshakeTimeout(d time.Duration) Option {
	return func(o *options) { o.handshakeTimeout = d }
}

// WithTick sets the resolution of the shared timing wheel (default 1 s). The
// handshake timeout is enforced to within one tick.
func WithTick(d time.Duration) Option { return func(o *options) { o.tick = d } }

// WithMaxPacket sets the largest packet body accepted from a client (default 64 KiB).
func WithMaxPacket(n int) Option { return func(o *options) { o.maxPacket = n } }

// WithWriteBacklog sets how many bytes may wait to be written to one client
// (default 256 KiB). A client that falls further behind is closed as a slow
// consumer.
func WithWriteBacklog(n int) Option { return func(o *options) { o.writeBacklog = n } }

// WithDictionary sets the route dictionary sent in the handshake and used to
// compress routes both ways.
func WithDictionary(d *message.Dictionary) Option { return func(o *options) { o.dict = d } }

// WithSerializer sets the payload serializer (default JSON).
func WithSerializer(s message.Serializer) Option { return func(o *options) { o.ser = s } }

// WithValidator sets the handshake validator.
func WithValidator(v Validator) Option { return func(o *options) { o.validator = v } }

// WithOutbound sets a hook run on every push and response before it is
// written; it may change the message, and an error drops it.
func WithOutbound(fn func(*session.Session, *message.Message) error) Option {
	return func(o *options) { o.outbound = fn }
}

// WithSessionIDs sets the session id generator (default: 1, 2, 3, ...).
func WithSessionIDs(fn func() int64) Option { return func(o *options) { o.ids = fn } }

// WithLogger sets the logger. Nothing is logged per message above debug level.
func WithLogger(l zerolog.Logger) Option { return func(o *options) { o.log = l } }

// WithPollers sets the number of event-loop goroutines (default: the number of CPUs).
func WithPollers(n int) Option { return func(o *options) { o.pollers = n } }
