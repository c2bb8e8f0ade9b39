// Package node assembles a nanomesh node: components and their dispatcher,
// the client-facing agent server, and (in cluster mode) discovery and the
// gRPC service between nodes. A single node needs no etcd.
package node

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nanomesh/nanomesh/agent"
	"github.com/nanomesh/nanomesh/discovery"
	"github.com/nanomesh/nanomesh/handler"
	"github.com/nanomesh/nanomesh/message"
	"github.com/nanomesh/nanomesh/session"
	"github.com/rs/zerolog"
)

// Option configures a Node.
type Option func(*options)

type component struct {
	comp handler.Component
	opts []handler.Option
}

type options struct {
	components []component
	agentOpts  []agent.Option
	dispOpts   []handler.DispatcherOption
	listens    bool
	compress   bool
	dict       map[string]uint16
	ser        message.Serializer
	outbound   []func(*session.Session, *message.Message) error
	onSession  []func(*session.Session)
	log        zerolog.Logger

	// cluster mode
	disc           discovery.Discovery
	id             string
	grpcAddr       string
	advertise      string
	labels         map[string]string
	clientAddrs    map[string]string
	routers        map[string]Router
	requestTimeout time.Duration
	sweep          time.Duration
	drainGrace     time.Duration
}

// Version is the nanomesh version published in member records.
const Version = "0.1.0"

// WithCluster makes the node a cluster member: it registers itself as id in
// d, serves the gRPC service between nodes on grpcAddr ("127.0.0.1:0" picks a
// port), and forwards messages for routes it does not serve to the nodes
// that do.
func WithCluster(d discovery.Discovery, id, grpcAddr string) Option {
	return func(o *options) { o.disc, o.id, o.grpcAddr = d, id, grpcAddr }
}

// WithAdvertiseAddr sets the gRPC address published to peers (default: the
// listener's address).
func WithAdvertiseAddr(addr string) Option { return func(o *options) { o.advertise = addr } }

// WithLabels sets labels published in the member record, for custom routers.
func WithLabels(labels map[string]string) Option { return func(o *options) { o.labels = labels } }

// WithRouter routes service's messages with r on every message, instead of
// the default: sticky per session (the first random choice is kept while that
// node lives).
func WithRouter(service string, r Router) Option {
	return func(o *options) {
		if o.routers == nil {
			o.routers = make(map[string]Router)
		}
		o.routers[service] = r
	}
}

// WithRequestTimeout bounds how long a forwarded request waits for the
// remote node's response before the client gets 504 (default 10 s).
func WithRequestTimeout(d time.Duration) Option { return func(o *options) { o.requestTimeout = d } }

// WithDrainGrace bounds how long a departing node waits for gates to stop
// sending it work after it deregistered (default 5 s, within Shutdown's ctx).
func WithDrainGrace(d time.Duration) Option { return func(o *options) { o.drainGrace = d } }

// WithComponent registers a component with its registration options.
func WithComponent(c handler.Component, opts ...handler.Option) Option {
	return func(o *options) { o.components = append(o.components, component{c, opts}) }
}

// WithTCPAddr serves raw TCP clients on addr.
func WithTCPAddr(addr string) Option {
	return func(o *options) { o.listens = true; o.agentOpts = append(o.agentOpts, agent.WithTCP(addr)) }
}

// WithWSAddr serves WebSocket clients (and WithHTTP handlers) on addr.
func WithWSAddr(addr string) Option {
	return func(o *options) { o.listens = true; o.agentOpts = append(o.agentOpts, agent.WithWS(addr)) }
}

// WithAgent passes options to the client-facing server: WebSocket path,
// origin check, TLS, heartbeat, handshake timeout and validator, size and
// backlog limits.
func WithAgent(opts ...agent.Option) Option {
	return func(o *options) { o.agentOpts = append(o.agentOpts, opts...) }
}

// WithHTTP serves h at pattern on the WebSocket address (e.g. a web client).
func WithHTTP(pattern string, h http.Handler) Option {
	return WithAgent(agent.WithHTTP(pattern, h))
}

// WithDispatcher passes options to the handler dispatcher: pool size,
// per-session queue bound, inbound pipeline.
func WithDispatcher(opts ...handler.DispatcherOption) Option {
	return func(o *options) { o.dispOpts = append(o.dispOpts, opts...) }
}

// WithInbound appends inbound pipeline stages, run before every handler.
func WithInbound(fns ...handler.Inbound) Option {
	return WithDispatcher(handler.WithInbound(fns...))
}

// WithOutbound appends outbound pipeline stages, run on every push and
// response before it is written.
func WithOutbound(fns ...func(*session.Session, *message.Message) error) Option {
	return func(o *options) { o.outbound = append(o.outbound, fns...) }
}

// WithRouteCompression gives every registered route a dictionary code,
// announced in the handshake, so routes travel as 2 bytes.
func WithRouteCompression() Option { return func(o *options) { o.compress = true } }

// WithDictionary sets explicit route codes (merged with WithRouteCompression's).
func WithDictionary(codes map[string]uint16) Option { return func(o *options) { o.dict = codes } }

// WithSerializer sets the payload serializer (default JSON).
func WithSerializer(s message.Serializer) Option { return func(o *options) { o.ser = s } }

// WithOnSession registers a callback run when a client completes the handshake.
func WithOnSession(fn func(*session.Session)) Option {
	return func(o *options) { o.onSession = append(o.onSession, fn) }
}

// WithLogger sets the logger. The default is silent; nothing is logged per
// message above debug level.
func WithLogger(l zerolog.Logger) Option { return func(o *options) { o.log = l } }

// Node is a nanomesh node.
type Node struct {
	opts    options
	reg     *handler.Registry
	disp    *handler.Dispatcher
	agent   *agent.Server
	cluster *cluster
	log     zerolog.Logger

	mu      sync.Mutex
	started bool
	stopped bool
}

// New returns a node configured by opts. Call Start to run it.
func New(opts ...Option) *Node {
	o := options{log: zerolog.Nop(), ser: message.JSON,
		requestTimeout: 10 * time.Second, sweep: 100 * time.Millisecond, drainGrace: 5 * time.Second}
	for _, opt := range opts {
		opt(&o)
	}
	return &Node{opts: o, reg: handler.NewRegistry(), log: o.log}
}

// ErrStarted is returned by Start on a node that was already started.
var ErrStarted = errors.New("node: already started")

// Start registers the components, runs their Init and AfterInit hooks, and
// starts serving. It returns once the listeners accept clients.
func (n *Node) Start(ctx context.Context) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.started {
		return ErrStarted
	}
	for _, c := range n.opts.components {
		if err := n.reg.Register(c.comp, c.opts...); err != nil {
			return fmt.Errorf("node: %w", err)
		}
	}
	dict, err := n.dictionary()
	if err != nil {
		return fmt.Errorf("node: %w", err)
	}
	dopts := []handler.DispatcherOption{handler.WithLogger(n.log)}
	if n.opts.disc != nil {
		n.cluster = &cluster{n: n, disc: n.opts.disc, log: n.log}
		dopts = append(dopts, handler.WithRemote(n.cluster.forward))
	}
	n.disp = handler.NewDispatcher(n.reg, append(dopts, n.opts.dispOpts...)...)
	n.reg.Init()
	n.disp.Start()
	if n.cluster != nil {
		if err := n.cluster.start(ctx); err != nil {
			_ = n.disp.Stop(ctx)
			n.reg.Shutdown()
			return err
		}
		num := int64(n.cluster.self.Num)
		var seq atomic.Int64
		n.opts.agentOpts = append(n.opts.agentOpts, agent.WithSessionIDs(func() int64 { return num<<40 | seq.Add(1) }))
		n.log.Info().Str("id", n.opts.id).Str("grpc", n.cluster.self.GRPCAddr).Uint32("num", n.cluster.self.Num).
			Msg("registered and routable")
	}
	if n.opts.listens {
		aopts := []agent.Option{
			agent.WithDictionary(dict),
			agent.WithSerializer(n.opts.ser),
			agent.WithLogger(n.log),
		}
		if len(n.opts.outbound) > 0 {
			aopts = append(aopts, agent.WithOutbound(n.outbound))
		}
		n.agent = agent.New(n, append(aopts, n.opts.agentOpts...)...)
		if err := n.agent.Start(ctx); err != nil {
			if n.cluster != nil {
				n.cluster.shutdown(ctx)
			}
			_ = n.disp.Stop(ctx)
			n.reg.Shutdown()
			return fmt.Errorf("node: %w", err)
		}
		if a := n.agent.WSAddr(); a != "" {
			n.log.Info().Str("addr", a).Str("path", n.agent.WSPath()).Msg("websocket listener ready")
		}
		if a := n.agent.TCPAddr(); a != "" {
			n.log.Info().Str("addr", a).Msg("tcp listener ready")
		}
	}
	n.started = true
	return nil
}

func (n *Node) dictionary() (*message.Dictionary, error) {
	codes := make(map[string]uint16, len(n.opts.dict))
	used := make(map[uint16]bool)
	for r, c := range n.opts.dict {
		codes[r], used[c] = c, true
	}
	if n.opts.compress {
		routes := n.reg.Routes()
		sort.Strings(routes)
		next := uint16(1)
		for _, r := range routes {
			if _, ok := codes[r]; ok {
				continue
			}
			for used[next] {
				next++
			}
			codes[r], used[next] = next, true
		}
	}
	return message.NewDictionary(codes, n.reg.Routes()...)
}

func (n *Node) outbound(s *session.Session, m *message.Message) error {
	for _, fn := range n.opts.outbound {
		if err := fn(s, m); err != nil {
			return err
		}
	}
	return nil
}

// OnSession implements agent.Handler.
func (n *Node) OnSession(s *session.Session) {
	for _, fn := range n.opts.onSession {
		fn(s)
	}
}

// OnMessage implements agent.Handler.
func (n *Node) OnMessage(s *session.Session, m *message.Message) error {
	return n.disp.Dispatch(s, m)
}

// OnClose implements agent.Handler.
func (n *Node) OnClose(s *session.Session) {
	if n.cluster != nil {
		n.cluster.onClientClose(s)
	}
}

// Shutdown stops the node gracefully: stop accepting clients, run
// BeforeShutdown hooks, drain in-flight handlers (new requests get 503), kick
// the remaining sessions with reason "shutdown", stop the workers and run the
// Shutdown hooks. ctx bounds the whole; on expiry the node is stopped anyway
// and the context's error returned.
func (n *Node) Shutdown(ctx context.Context) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if !n.started || n.stopped {
		return nil
	}
	n.stopped = true
	var errs []error
	if n.cluster != nil {
		errs = append(errs, n.cluster.deregister(ctx))
	}
	if n.agent != nil {
		n.agent.StopAccepting()
	}
	n.reg.BeforeShutdown()
	if n.cluster != nil {
		n.cluster.waitLinks(ctx)
	}
	errs = append(errs, n.disp.Drain(ctx))
	if n.agent != nil {
		errs = append(errs, n.agent.Shutdown(ctx))
	}
	if n.cluster != nil {
		n.cluster.shutdown(ctx)
	}
	errs = append(errs, n.disp.Stop(ctx))
	n.reg.Shutdown()
	return errors.Join(errs...)
}

// ID returns the node id ("" for a single node).
func (n *Node) ID() string { return n.opts.id }

// Member returns the node's published member record, or nil for a single node.
func (n *Node) Member() *discovery.Member {
	if n.cluster == nil {
		return nil
	}
	return n.cluster.self
}

// GRPCAddr returns the address of the gRPC service between nodes, or "".
func (n *Node) GRPCAddr() string {
	if n.cluster == nil {
		return ""
	}
	return n.cluster.ln.Addr().String()
}

// TCPAddr returns the client TCP listener's address, or "".
func (n *Node) TCPAddr() string {
	if n.agent == nil {
		return ""
	}
	return n.agent.TCPAddr()
}

// WSAddr returns the client WebSocket listener's address, or "".
func (n *Node) WSAddr() string {
	if n.agent == nil {
		return ""
	}
	return n.agent.WSAddr()
}

// Agent returns the client-facing server, or nil if the node has no listener.
func (n *Node) Agent() *agent.Server { return n.agent }

// Registry returns the node's handler registry.
func (n *Node) Registry() *handler.Registry { return n.reg }

// Dispatcher returns the node's dispatcher (for serial executors and timers).
func (n *Node) Dispatcher() *handler.Dispatcher { return n.disp }
