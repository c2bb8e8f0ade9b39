// Command cluster is the chat demo as a nanomesh cluster: gates that hold the
// clients and serve the chat page, chat nodes that run the room, and etcd for
// membership. One binary plays every role:
//
//	cluster -role etcd -etcd 127.0.0.1:2379                    # embedded etcd only
//	cluster -role chat -id chat-1 -etcd 127.0.0.1:2379 -grpc 127.0.0.1:4251
//	cluster -role gate -id gate-1 -etcd 127.0.0.1:2379 -ws 127.0.0.1:3250 -tcp 127.0.0.1:3251 -grpc 127.0.0.1:4250
//	cluster                                                    # all in one process
//
// Without -role it runs an all-in-one demo: an embedded etcd, one gate and two
// chat nodes in one process; open the printed URL in two browser tabs.
//
// The room's members live in the memory of one chat node, so every session
// must reach the same chat node: the gate routes the room service with
// Oldest, which picks the chat node that started first. When it dies (its
// lease expires) or leaves (graceful shutdown), the next oldest takes over;
// a chat node that comes back is the newest and takes nothing over. See
// docs/cluster.md.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/nanomesh/nanomesh/agent"
	"github.com/nanomesh/nanomesh/discovery"
	"github.com/nanomesh/nanomesh/discovery/embedded"
	"github.com/nanomesh/nanomesh/examples/chat/room"
	"github.com/nanomesh/nanomesh/examples/chat/web"
	"github.com/nanomesh/nanomesh/node"
	"github.com/nanomesh/nanomesh/session"
	"github.com/rs/zerolog"
)

type config struct {
	role      string
	id        string
	etcd      string
	prefix    string
	ttl       time.Duration
	etcdDir   string
	ws        string
	tcp       string
	wsPath    string
	grpc      string
	advertise string
	json      bool
	set       map[string]bool // flags given on the command line
}

func main() {
	var c config
	flag.StringVar(&c.role, "role", "", `"gate", "chat" or "etcd"; empty runs the all-in-one demo`)
	flag.StringVar(&c.id, "id", "", "node id, unique in the cluster (default <role>-<hostname>)")
	flag.StringVar(&c.etcd, "etcd", "127.0.0.1:2379", "etcd endpoints, comma separated (-role etcd: the address to serve on)")
	flag.StringVar(&c.prefix, "etcd-prefix", discovery.DefaultPrefix, "etcd key prefix of the cluster")
	flag.DurationVar(&c.ttl, "ttl", discovery.DefaultLeaseTTL, "member lease TTL: a crashed node leaves its peers' tables after about this long")
	flag.StringVar(&c.etcdDir, "etcd-dir", "", "data directory of the embedded etcd (-role etcd and all-in-one; default: a temporary one)")
	flag.StringVar(&c.ws, "ws", ":3250", "gate: WebSocket listen address (also serves the page at /web/)")
	flag.StringVar(&c.tcp, "tcp", ":3251", "gate: TCP listen address (empty: none)")
	flag.StringVar(&c.wsPath, "wspath", "/nano", "gate: WebSocket path")
	flag.StringVar(&c.grpc, "grpc", "127.0.0.1:0", "gRPC listen address for the other nodes")
	flag.StringVar(&c.advertise, "advertise", "", "gRPC address published to the other nodes (default: the listen address; needed when listening on 0.0.0.0)")
	flag.BoolVar(&c.json, "json", false, "log JSON lines instead of text")
	flag.Parse()
	c.set = map[string]bool{}
	flag.Visit(func(f *flag.Flag) { c.set[f.Name] = true })

	zerolog.TimeFieldFormat = time.RFC3339Nano
	var log zerolog.Logger
	if c.json {
		log = zerolog.New(os.Stderr).With().Timestamp().Logger()
	} else {
		log = zerolog.New(zerolog.ConsoleWriter{Out: os.Stderr, TimeFormat: "15:04:05.000", NoColor: !terminal(os.Stderr)}).With().Timestamp().Logger()
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, stop, c, log); err != nil {
		log.Error().Err(err).Msg("exit")
		os.Exit(1)
	}
}

// terminal reports whether f is a character device (colored logs).
func terminal(f *os.File) bool {
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

// run serves c.role until ctx ends, then shuts down gracefully. stop
// restores the default signal handling, so that a second signal kills.
func run(ctx context.Context, stop func(), c config, log zerolog.Logger) error {
	var parts []part // shut down in reverse order
	defer func() {
		stop()
		shutdown(parts, log)
	}()
	switch c.role {
	case "etcd":
		srv, err := startEtcd(ctx, c, c.etcd, log)
		if err != nil {
			return err
		}
		parts = append(parts, srv)
	case "gate", "chat":
		if c.id == "" {
			h, _ := os.Hostname()
			c.id = c.role + "-" + h
		}
		n, err := startNode(ctx, c, c.role, c.id, endpoints(c.etcd), log)
		if err != nil {
			return err
		}
		parts = append(parts, n)
	case "":
		c.grpc, c.advertise = "127.0.0.1:0", "" // three nodes in one process
		addr := "127.0.0.1:0"
		if c.set["etcd"] {
			addr = c.etcd
		}
		srv, err := startEtcd(ctx, c, addr, log)
		if err != nil {
			return err
		}
		parts = append(parts, srv)
		eps := srv.Endpoints()
		for _, id := range []string{"chat-1", "chat-2"} {
			n, err := startNode(ctx, c, "chat", id, eps, log)
			if err != nil {
				return err
			}
			parts = append(parts, n)
		}
		g, err := startNode(ctx, c, "gate", "gate-1", eps, log)
		if err != nil {
			return err
		}
		parts = append(parts, g)
	default:
		return fmt.Errorf("unknown -role %q (want gate, chat, etcd or nothing)", c.role)
	}
	<-ctx.Done()
	log.Info().Msg("signal received: shutting down (a second signal kills)")
	return nil
}

// part is a running piece of the process.
type part interface{ close(context.Context) error }

func shutdown(parts []part, log zerolog.Logger) {
	for i := len(parts) - 1; i >= 0; i-- {
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		if err := parts[i].close(ctx); err != nil {
			log.Error().Err(err).Msg("shutdown")
		}
		cancel()
	}
}

func endpoints(s string) []string {
	var out []string
	for _, e := range strings.Split(s, ",") {
		if e = strings.TrimSpace(e); e != "" {
			out = append(out, e)
		}
	}
	return out
}

type etcdPart struct {
	*embedded.Server
	log zerolog.Logger
}

func (e etcdPart) close(context.Context) error {
	err := e.Close()
	e.log.Info().Msg("etcd stopped")
	return err
}

// startEtcd runs an embedded single-node etcd serving clients on addr.
func startEtcd(ctx context.Context, c config, addr string, log zerolog.Logger) (etcdPart, error) {
	log = log.With().Str("node", "etcd").Logger()
	opts := []embedded.Option{embedded.WithClientURL(addr)}
	if c.etcdDir != "" {
		opts = append(opts, embedded.WithDir(c.etcdDir))
	}
	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	srv, err := embedded.Start(sctx, opts...)
	if err != nil {
		return etcdPart{}, err
	}
	log.Info().Str("endpoint", srv.Endpoints()[0]).Str("dir", srv.Dir()).Msg("etcd ready")
	return etcdPart{srv, log}, nil
}

type nodePart struct {
	*node.Node
	log zerolog.Logger
}

func (n nodePart) close(ctx context.Context) error {
	err := n.Shutdown(ctx)
	n.log.Info().Msg("node stopped")
	return err
}

// startNode starts a gate or a chat node registered in etcd at eps.
func startNode(ctx context.Context, c config, role, id string, eps []string, log zerolog.Logger) (nodePart, error) {
	log = log.With().Str("node", id).Logger()
	disc, err := discovery.NewEtcd(
		discovery.WithEndpoints(eps...),
		discovery.WithPrefix(c.prefix),
		discovery.WithLeaseTTL(c.ttl),
		discovery.WithLogger(log),
	)
	if err != nil {
		return nodePart{}, err
	}
	adv, err := advertise(c)
	if err != nil {
		return nodePart{}, err
	}
	opts := []node.Option{
		node.WithLogger(log),
		node.WithCluster(disc, id, c.grpc),
		node.WithAdvertiseAddr(adv),
		node.WithLabels(map[string]string{"role": role}),
		node.WithRouter("room", Oldest()),
	}
	var n *node.Node
	switch role {
	case "chat":
		opts = append(opts, node.WithComponent(room.New(), room.Options()...))
	case "gate":
		opts = append(opts,
			node.WithWSAddr(c.ws),
			node.WithAgent(agent.WithWSPath(c.wsPath)),
			node.WithHTTP("/web/", http.StripPrefix("/web/", web.Handler(c.wsPath))),
			node.WithHTTP("/{$}", http.RedirectHandler("/web/", http.StatusFound)),
			node.WithHTTP("/cluster", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				serveTable(w, disc, n)
			})),
		)
		if c.tcp != "" {
			opts = append(opts, node.WithTCPAddr(c.tcp))
		}
	}
	n = node.New(opts...)
	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := n.Start(sctx); err != nil {
		cctx, ccancel := context.WithTimeout(context.Background(), time.Second)
		_ = disc.Close(cctx)
		ccancel()
		return nodePart{}, fmt.Errorf("%s: %w", id, err)
	}
	if role == "gate" {
		log.Info().Str("url", pageURL(n.WSAddr())).Msg("chat page")
	}
	return nodePart{n, log}, nil
}

// advertise returns the gRPC address to publish: -advertise, or the listen
// address when it names a host. A wildcard listen address (":4250",
// "0.0.0.0:4250") is published as <hostname>:port, which works where
// hostnames resolve, as in docker compose.
func advertise(c config) (string, error) {
	if c.advertise != "" {
		return c.advertise, nil
	}
	host, port, err := net.SplitHostPort(c.grpc)
	if err != nil {
		return "", fmt.Errorf("-grpc %q: %w", c.grpc, err)
	}
	if host == "" || net.ParseIP(host) != nil && net.ParseIP(host).IsUnspecified() {
		if port == "0" {
			return "", errors.New("-grpc with a wildcard host and port 0: set -advertise or a fixed port")
		}
		h, err := os.Hostname()
		if err != nil {
			return "", fmt.Errorf("-grpc %q without -advertise: %w", c.grpc, err)
		}
		return net.JoinHostPort(h, port), nil
	}
	return "", nil // the listener's address
}

// pageURL is the chat page on a gate's WebSocket address.
func pageURL(addr string) string {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "http://" + addr + "/web/"
	}
	if ip := net.ParseIP(host); host == "" || ip != nil && ip.IsUnspecified() {
		host = "127.0.0.1"
	}
	return "http://" + net.JoinHostPort(host, port) + "/web/"
}

// Oldest routes every message of a service to one member: the one that
// started first, ties broken by the lowest id. It is the room's router: the
// room lives in one chat node's memory, so all sessions must reach the same
// one. When that node dies or leaves, the next oldest takes over, and a node
// that restarts is the newest, so it does not take the room back.
func Oldest() node.Router {
	return func(_ *session.Session, _ string, ms []*discovery.Member) *discovery.Member {
		best := ms[0] // ms is sorted by id
		for _, m := range ms[1:] {
			if m.StartedAt.Before(best.StartedAt) {
				best = m
			}
		}
		return best
	}
}

// tableView is what GET /cluster on a gate returns.
type tableView struct {
	Self    string       `json:"self"`
	Rev     int64        `json:"rev"`
	Room    string       `json:"room"` // the chat node serving the room
	Members []memberView `json:"members"`
}

type memberView struct {
	ID        string    `json:"id"`
	Num       uint32    `json:"num"`
	GRPCAddr  string    `json:"grpcAddr"`
	Role      string    `json:"role,omitempty"`
	Services  []string  `json:"services,omitempty"`
	StartedAt time.Time `json:"startedAt"`
}

// serveTable writes the gate's member table: for demos and the smoke tests.
func serveTable(w http.ResponseWriter, d discovery.Discovery, n *node.Node) {
	t := d.Table()
	v := tableView{Rev: t.Rev, Members: []memberView{}}
	if n != nil {
		v.Self = n.ID()
	}
	for _, m := range t.Members {
		mv := memberView{ID: m.ID, Num: m.Num, GRPCAddr: m.GRPCAddr, Role: m.Labels["role"], StartedAt: m.StartedAt}
		for _, s := range m.Services {
			mv.Services = append(mv.Services, s.Name)
		}
		v.Members = append(v.Members, mv)
	}
	sort.Slice(v.Members, func(i, j int) bool { return v.Members[i].ID < v.Members[j].ID })
	if ms := t.ByService("room"); len(ms) > 0 {
		v.Room = Oldest()(nil, "room", ms).ID
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}
