package client

import (
	"crypto/tls"
	"net"
	"net/http"

	"github.com/nanomesh/nanomesh/message"
	"github.com/nanomesh/nanomesh/packet"
)

// Option configures Dial and DialRaw.
type Option func(*config)

type config struct {
	serializer  message.Serializer // nil: the one the server announces, else JSON
	user        any
	heartbeat   bool
	maxPacket   int
	dialer      *net.Dialer
	localAddr   net.Addr
	tls         *tls.Config
	header      http.Header
	compression bool
}

func newConfig(opts []Option) *config {
	c := &config{heartbeat: true, maxPacket: packet.MaxBodyLen, compression: true}
	for _, o := range opts {
		o(c)
	}
	return c
}

// WithSerializer sets the serializer used for request, notify and response
// payloads. Without it the client uses the serializer the server announces in
// its handshake reply ("json" or "protobuf"), and JSON if the server announces
// none or one it does not know.
func WithSerializer(s message.Serializer) Option {
	return func(c *config) { c.serializer = s }
}

// WithUser sets the "user" member of the handshake the client sends. The value
// is encoded with encoding/json; nil (the default) omits the member.
func WithUser(v any) Option {
	return func(c *config) { c.user = v }
}

// WithHeartbeat enables or disables the heartbeat packets a Client sends every
// heartbeat interval announced by the server. It is enabled by default;
// disable it to test the server's idle timeout.
func WithHeartbeat(enabled bool) Option {
	return func(c *config) { c.heartbeat = enabled }
}

// WithMaxPacket sets the largest packet body, and the largest inflated message
// payload, the client accepts from the server. A larger packet ends the
// connection with a protocol error. The default is packet.MaxBodyLen, the
// largest body the protocol can describe; values <= 0 restore it.
func WithMaxPacket(n int) Option {
	return func(c *config) {
		if n <= 0 || n > packet.MaxBodyLen {
			n = packet.MaxBodyLen
		}
		c.maxPacket = n
	}
}

// WithDialer sets the dialer used to open the connection, for example to set a
// timeout, keep-alive or source address. The dialer is not modified.
func WithDialer(d *net.Dialer) Option {
	return func(c *config) { c.dialer = d }
}

// WithLocalAddr binds the connection to a local (source) address, such as
// &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}, so that a load test can spread
// its connections over several source addresses. It overrides the LocalAddr of
// a dialer given with WithDialer.
func WithLocalAddr(addr net.Addr) Option {
	return func(c *config) { c.localAddr = addr }
}

// WithTLS sets the TLS configuration used for "wss://" addresses, and makes a
// "tcp://" address use TLS as well. For "wss://" without this option the
// client uses a default configuration that verifies the server's host name.
func WithTLS(cfg *tls.Config) Option {
	return func(c *config) { c.tls = cfg }
}

// WithHeader adds HTTP header fields to the WebSocket opening handshake, for
// example Origin or a cookie. It has no effect on TCP connections.
func WithHeader(h http.Header) Option {
	return func(c *config) { c.header = h }
}

// WithRouteCompression enables or disables the compression of outgoing routes
// through the route dictionary the server sends in its handshake reply. It is
// enabled by default. Incoming compressed routes are always decoded.
func WithRouteCompression(enabled bool) Option {
	return func(c *config) { c.compression = enabled }
}
