// Package server runs the servers under test as child processes of the bench
// command: a nanomesh node (single, gate or backend, with etcd discovery in
// cluster mode) or the goroutine-per-connection baseline, all with the same
// bench handlers. The parent reads the child's memory and CPU from /proc and
// asks it for in-process figures (goroutines, sessions, heap) over stdin.
package server

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	_ "net/http/pprof" // served on Config.Pprof
	"os"
	"runtime"
	"runtime/debug"
	"sync/atomic"
	"time"

	"github.com/nanomesh/nanomesh/agent"
	"github.com/nanomesh/nanomesh/bench/internal/baseline"
	"github.com/nanomesh/nanomesh/bench/internal/child"
	"github.com/nanomesh/nanomesh/discovery"
	"github.com/nanomesh/nanomesh/handler"
	"github.com/nanomesh/nanomesh/node"
	"github.com/nanomesh/nanomesh/session"
	"github.com/rs/zerolog"
)

// Sub is the hidden subcommand that runs a server child.
const Sub = "_server"

// Implementations and roles.
const (
	Nanomesh = "nanomesh"
	Baseline = "baseline"

	RoleSingle  = "single"  // clients and handlers in one process
	RoleGate    = "gate"    // clients; handlers on a backend
	RoleBackend = "backend" // handlers only, reached from gates
)

// Config configures a server child.
type Config struct {
	Impl      string        `json:"impl"`
	Role      string        `json:"role"`
	ID        string        `json:"id"`
	TCP       string        `json:"tcp"` // client TCP listen address, "" for none
	WS        string        `json:"ws"`  // client WebSocket listen address, "" for none
	Heartbeat time.Duration `json:"heartbeat"`
	Pollers   int           `json:"pollers"`
	Etcd      []string      `json:"etcd"`     // nanomesh cluster: etcd endpoints
	LeaseTTL  time.Duration `json:"leaseTtl"` // nanomesh cluster
	GRPC      string        `json:"grpc"`     // gRPC listen address (cluster)
	Backend   string        `json:"backend"`  // baseline gate: backend gRPC address
	Probe     string        `json:"probe"`    // backend: extra service name whose ping reports its first call
	Pprof     string        `json:"pprof"`    // net/http/pprof listen address, "" for none
	Debug     bool          `json:"debug"`    // nanomesh: debug-level log on stderr
}

// Ready is sent once the server accepts clients.
type Ready struct {
	TCP          string `json:"tcp,omitempty"`
	WS           string `json:"ws,omitempty"`
	GRPC         string `json:"grpc,omitempty"`
	Pprof        string `json:"pprof,omitempty"`
	StartNS      int64  `json:"startNs"`      // unix nanos before Start
	RegisteredNS int64  `json:"registeredNs"` // unix nanos when Start returned (registered in etcd)
	Pid          int    `json:"pid"`
}

// Stats are in-process figures.
type Stats struct {
	Goroutines int    `json:"goroutines"`
	Conns      int64  `json:"conns"`
	Sessions   int64  `json:"sessions"`
	Opened     int64  `json:"opened"` // sessions established since start
	Closed     int64  `json:"closed"` // sessions ended since start
	Dropped    int64  `json:"dropped,omitempty"`
	HeapInuse  uint64 `json:"heapInuse"`
	HeapSys    uint64 `json:"heapSys"`
	StackInuse uint64 `json:"stackInuse"`
	GoSys      uint64 `json:"goSys"`
	NumGC      uint32 `json:"numGC"`
}

// Member is a membership event seen by a gate.
type Member struct {
	Event string `json:"event"`
	ID    string `json:"id"`
	T     int64  `json:"t"`
}

// EchoMsg is the echo request and response body.
type EchoMsg struct {
	Msg string `json:"msg"`
}

// Bench is the nanomesh bench component: routes bench.echo, bench.ping,
// bench.join and bench.shout.
type Bench struct {
	handler.Base
	group *session.Group
}

var ok = []byte(`{"code":0}`)

// Echo answers with the request.
func (b *Bench) Echo(s *session.Session, m *EchoMsg) error { return s.Response(m) }

// Ping answers {"code":0}.
func (b *Bench) Ping(s *session.Session, _ []byte) error { return s.Response(ok) }

// Join adds the session to the bench group.
func (b *Bench) Join(s *session.Session, _ []byte) error {
	if err := b.group.Add(s); err != nil {
		return err
	}
	return s.Response(ok)
}

// Shout broadcasts the request body to the group on "onShout".
func (b *Bench) Shout(s *session.Session, data []byte) error {
	_ = b.group.Broadcast("onShout", data)
	if s.LastMID() != 0 {
		return s.Response(ok)
	}
	return nil
}

// Probe is a backend's own service; its first ping is reported to the parent.
type Probe struct {
	handler.Base
	out   *child.Out
	first atomic.Bool
}

// Ping answers and reports the first call.
func (p *Probe) Ping(s *session.Session, _ []byte) error {
	if !p.first.Swap(true) {
		p.out.Send("first", nil)
	}
	return s.Response(ok)
}

// Gate is a placeholder component for gates.
type Gate struct{ handler.Base }

// Ping answers {"code":0}.
func (Gate) Ping(s *session.Session, _ []byte) error { return s.Response(ok) }

// Main runs a server child until stdin closes or "quit".
func Main() error {
	var cfg Config
	cmds, err := child.ReadConfig(&cfg)
	if err != nil {
		return err
	}
	out := child.NewOut()
	if cfg.Heartbeat <= 0 {
		cfg.Heartbeat = 30 * time.Second
	}
	var ready Ready
	ready.Pid = os.Getpid()
	if cfg.Pprof != "" {
		ln, err := net.Listen("tcp", cfg.Pprof)
		if err != nil {
			return err
		}
		ready.Pprof = ln.Addr().String()
		go func() { _ = http.Serve(ln, nil) }()
	}
	var stats func() Stats
	var shutdown func()
	switch cfg.Impl {
	case Nanomesh:
		stats, shutdown, err = runNanomesh(&cfg, &ready, out)
	case Baseline:
		stats, shutdown, err = runBaseline(&cfg, &ready)
	default:
		err = fmt.Errorf("unknown impl %q", cfg.Impl)
	}
	if err != nil {
		return err
	}
	full := func() Stats {
		st := stats()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		st.Goroutines = runtime.NumGoroutine()
		st.HeapInuse, st.HeapSys, st.StackInuse, st.GoSys, st.NumGC = ms.HeapInuse, ms.HeapSys, ms.StackInuse, ms.Sys, ms.NumGC
		return st
	}
	out.Send("ready", ready)
	for cmd := range cmds {
		switch cmd {
		case "stats":
			out.Send("stats", full())
		case "gc":
			runtime.GC()
			debug.FreeOSMemory()
			out.Send("stats", full())
		case "quit":
			shutdown()
			out.Send("bye", nil)
			return nil
		}
	}
	shutdown()
	return nil
}

func runNanomesh(cfg *Config, ready *Ready, out *child.Out) (func() Stats, func(), error) {
	var opened, closed atomic.Int64
	aopts := []agent.Option{agent.WithHeartbeat(cfg.Heartbeat)}
	if cfg.Pollers > 0 {
		aopts = append(aopts, agent.WithPollers(cfg.Pollers))
	}
	if cfg.Debug {
		log := zerolog.New(os.Stderr).With().Timestamp().Str("node", cfg.ID).Logger().Level(zerolog.DebugLevel)
		aopts = append(aopts, agent.WithLogger(log))
	}
	opts := []node.Option{
		node.WithAgent(aopts...),
		node.WithOnSession(func(s *session.Session) {
			opened.Add(1)
			s.OnClose(func(*session.Session) { closed.Add(1) })
		}),
	}
	if cfg.TCP != "" {
		opts = append(opts, node.WithTCPAddr(cfg.TCP))
	}
	if cfg.WS != "" {
		opts = append(opts, node.WithWSAddr(cfg.WS))
	}
	lower := handler.WithNameFunc(handler.LowerFirst)
	switch cfg.Role {
	case RoleSingle, RoleBackend:
		opts = append(opts, node.WithComponent(&Bench{group: session.NewGroup("bench", nil)}, handler.WithName("bench"), lower))
	case RoleGate:
		opts = append(opts, node.WithComponent(Gate{}, handler.WithName("gate"), lower))
	default:
		return nil, nil, fmt.Errorf("unknown role %q", cfg.Role)
	}
	if cfg.Probe != "" {
		opts = append(opts, node.WithComponent(&Probe{out: out}, handler.WithName(cfg.Probe), lower))
	}
	var disc *discovery.Etcd
	if cfg.Role != RoleSingle {
		eopts := []discovery.EtcdOption{discovery.WithEndpoints(cfg.Etcd...)}
		if cfg.LeaseTTL > 0 {
			eopts = append(eopts, discovery.WithLeaseTTL(cfg.LeaseTTL))
		}
		var err error
		if disc, err = discovery.NewEtcd(eopts...); err != nil {
			return nil, nil, err
		}
		grpcAddr := cfg.GRPC
		if grpcAddr == "" {
			grpcAddr = "127.0.0.1:0"
		}
		opts = append(opts, node.WithCluster(disc, cfg.ID, grpcAddr))
		if cfg.Role == RoleGate {
			disc.Subscribe(func(ev discovery.Event) {
				out.Send("member", Member{Event: ev.Type.String(), ID: ev.Member.ID, T: time.Now().UnixNano()})
			})
		}
	}
	n := node.New(opts...)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ready.StartNS = time.Now().UnixNano()
	if err := n.Start(ctx); err != nil {
		return nil, nil, err
	}
	ready.RegisteredNS = time.Now().UnixNano()
	ready.TCP, ready.WS, ready.GRPC = n.TCPAddr(), n.WSAddr(), n.GRPCAddr()
	stats := func() Stats {
		st := Stats{Opened: opened.Load(), Closed: closed.Load()}
		if a := n.Agent(); a != nil {
			st.Conns, st.Sessions = int64(a.Count()), int64(a.Sessions())
		}
		return st
	}
	shutdown := func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		_ = n.Shutdown(ctx)
	}
	return stats, shutdown, nil
}

func runBaseline(cfg *Config, ready *Ready) (func() Stats, func(), error) {
	handlers := baseline.Handlers(baseline.NewGroup())
	var closers []func()
	switch cfg.Role {
	case RoleBackend:
		b, addr, err := baseline.ServeBackend(orDefault(cfg.GRPC, "127.0.0.1:0"), handlers)
		if err != nil {
			return nil, nil, err
		}
		ready.GRPC = addr
		return func() Stats { return Stats{} }, b.Close, nil
	case RoleGate:
		if cfg.Backend == "" {
			return nil, nil, errors.New("baseline gate needs a backend address")
		}
		remote, closeRemote, err := baseline.DialBackend(cfg.Backend)
		if err != nil {
			return nil, nil, err
		}
		closers = append(closers, closeRemote)
		handlers = nil
		return serveBaseline(cfg, ready, baseline.Config{Heartbeat: cfg.Heartbeat, Remote: remote}, closers)
	case RoleSingle:
		return serveBaseline(cfg, ready, baseline.Config{Heartbeat: cfg.Heartbeat, Handlers: handlers}, closers)
	}
	return nil, nil, fmt.Errorf("unknown role %q", cfg.Role)
}

func serveBaseline(cfg *Config, ready *Ready, bc baseline.Config, closers []func()) (func() Stats, func(), error) {
	srv := baseline.New(bc)
	var err error
	if cfg.TCP != "" {
		if ready.TCP, err = srv.ListenTCP(cfg.TCP); err != nil {
			return nil, nil, err
		}
	}
	if cfg.WS != "" {
		if ready.WS, err = srv.ListenWS(cfg.WS, "/nano"); err != nil {
			return nil, nil, err
		}
	}
	ready.StartNS = time.Now().UnixNano()
	ready.RegisteredNS = ready.StartNS
	stats := func() Stats {
		st := srv.Stats()
		return Stats{Conns: st.Conns, Sessions: st.Sessions, Opened: st.Opened, Closed: st.Opened - st.Sessions, Dropped: st.Dropped}
	}
	return stats, func() {
		srv.Close()
		for _, c := range closers {
			c()
		}
	}, nil
}

func orDefault(s, d string) string {
	if s == "" {
		return d
	}
	return s
}
