// Package embedded runs a single-node etcd inside the process, on loopback,
// for development, demos and tests that need a real etcd without an
// external one. It logs nothing, does not auto-compact and, unless
// WithFsync(true) is given, does not fsync its log.
//
// A Server keeps its client address across Stop and Restart, so clients that
// were connected before reconnect by themselves once it is back:
//
//	srv, err := embedded.Start(ctx)
//	...
//	cli := srv.Endpoints() // e.g. ["http://127.0.0.1:41234"]
//	srv.Stop()             // outage: data kept, address reserved for Restart
//	srv.Restart(ctx)       // same data dir, same address
//	srv.Close()            // stops and removes the data dir if Start created it
package embedded

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
	"google.golang.org/grpc"
)

// Option configures Start.
type Option func(*config)

type config struct {
	dir        string
	clientAddr string
	peerAddr   string
	compaction string // auto-compaction retention, "" or "0" = off
	fsync      bool
}

// WithDir sets the data directory. It is created if needed and kept by
// Close. By default Start uses a new temporary directory that Close removes.
func WithDir(dir string) Option { return func(c *config) { c.dir = dir } }

// WithClientURL sets the client address, "host:port" or
// "http://host:port" (default "127.0.0.1:0": a free port chosen at Start
// and kept for the life of the Server).
func WithClientURL(addr string) Option { return func(c *config) { c.clientAddr = addr } }

// WithPeerURL sets the peer address (default "127.0.0.1:0"). A single-node
// server never dials it, so it rarely matters.
func WithPeerURL(addr string) Option { return func(c *config) { c.peerAddr = addr } }

// WithAutoCompaction enables periodic auto-compaction with the given
// retention (an etcd duration such as "1h"). It is off by default.
func WithAutoCompaction(retention string) Option {
	return func(c *config) { c.compaction = retention }
}

// WithFsync makes etcd fsync its log (off by default: the embedded server
// is meant for development and tests, where speed matters more than surviving
// a power loss).
func WithFsync(on bool) Option { return func(c *config) { c.fsync = on } }

// Server is a running (or stopped) embedded etcd.
type Server struct {
	mu      sync.Mutex
	cfg     config
	dir     string
	ownDir  bool
	client  string // "127.0.0.1:port", fixed after the first start
	etcd    *embed.Etcd
	servers []*grpc.Server // the etcd gRPC servers, stopped hard by Stop
}

// Start starts etcd and waits until it serves requests or ctx ends.
func Start(ctx context.Context, opts ...Option) (*Server, error) {
	c := config{clientAddr: "127.0.0.1:0", peerAddr: "127.0.0.1:0"}
	for _, o := range opts {
		o(&c)
	}
	s := &Server{cfg: c, dir: c.dir, client: hostPort(c.clientAddr)}
	if s.dir == "" {
		dir, err := os.MkdirTemp("", "nanomesh-etcd-*")
		if err != nil {
			return nil, fmt.Errorf("embedded etcd: %w", err)
		}
		s.dir, s.ownDir = dir, true
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.startLocked(ctx); err != nil {
		if s.ownDir {
			os.RemoveAll(s.dir)
		}
		return nil, err
	}
	return s, nil
}

func hostPort(addr string) string {
	if u, err := url.Parse(addr); err == nil && u.Host != "" {
		return u.Host
	}
	return strings.TrimPrefix(addr, "http://")
}

func (s *Server) startLocked(ctx context.Context) error {
	if s.etcd != nil {
		return errors.New("embedded etcd: already running")
	}
	cfg := embed.NewConfig()
	cfg.Name = "nanomesh"
	cfg.Dir = s.dir
	cfg.Logger = "zap"
	cfg.LogLevel = "error"
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	cfg.UnsafeNoFsync = !s.cfg.fsync
	cfg.EnableGRPCGateway = false
	// A single node elects itself; short ticks make it ready quickly and let
	// tests use 1 s lease TTLs (etcd's minimum TTL is 1.5 election timeouts).
	cfg.TickMs = 50
	cfg.ElectionMs = 500
	cfg.AutoCompactionMode = embed.CompactorModePeriodic
	cfg.AutoCompactionRetention = "0"
	if s.cfg.compaction != "" {
		cfg.AutoCompactionRetention = s.cfg.compaction
	}
	curl := url.URL{Scheme: "http", Host: s.client}
	purl := url.URL{Scheme: "http", Host: hostPort(s.cfg.peerAddr)}
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{curl}, []url.URL{curl}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{purl}, []url.URL{purl}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	var servers []*grpc.Server
	var smu sync.Mutex
	cfg.ServiceRegister = func(g *grpc.Server) {
		smu.Lock()
		servers = append(servers, g)
		smu.Unlock()
	}

	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return fmt.Errorf("embedded etcd: start: %w", err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case err = <-e.Err():
	case <-e.Server.StopNotify():
		err = errors.New("stopped while starting")
	case <-ctx.Done():
		err = ctx.Err()
	}
	if err != nil {
		e.Close()
		return fmt.Errorf("embedded etcd: start: %w", err)
	}
	s.etcd = e
	// Keep the port chosen for ":0" so that Restart comes back on it.
	s.client = e.Clients[0].Addr().String()
	// ServiceRegister runs when the client servers start, which happens
	// before ReadyNotify; wait a little in case it has not yet.
	deadline := time.Now().Add(time.Second)
	for {
		smu.Lock()
		s.servers = append([]*grpc.Server(nil), servers...)
		smu.Unlock()
		if len(s.servers) > 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	return nil
}

// Endpoints returns the client URLs, such as "http://127.0.0.1:41234". They
// stay the same across Stop and Restart.
func (s *Server) Endpoints() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return []string{"http://" + s.client}
}

// Dir returns the data directory.
func (s *Server) Dir() string { return s.dir }

// Stop stops etcd abruptly, as in an outage: client connections are cut
// at once rather than drained. The data directory and the client address
// are kept for Restart. Stopping a stopped server is a no-op.
func (s *Server) Stop() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stopLocked()
}

func (s *Server) stopLocked() error {
	if s.etcd == nil {
		return nil
	}
	// Without this, embed.Etcd.Close waits for open watch and keep-alive
	// streams for several seconds before giving up.
	for _, g := range s.servers {
		g.Stop()
	}
	s.etcd.Close()
	s.etcd, s.servers = nil, nil
	return nil
}

// Restart starts a stopped server again on the same data directory and
// client address, and waits until it serves requests or ctx ends.
func (s *Server) Restart(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.startLocked(ctx)
}

// Close stops etcd and removes the data directory if Start created it.
func (s *Server) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	err := s.stopLocked()
	if s.ownDir {
		if rerr := os.RemoveAll(s.dir); rerr != nil && err == nil {
			err = fmt.Errorf("embedded etcd: remove data dir: %w", rerr)
		}
		s.ownDir = false
	}
	return err
}
