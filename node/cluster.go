package node

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nanomesh/nanomesh/discovery"
	"github.com/nanomesh/nanomesh/message"
	"github.com/nanomesh/nanomesh/node/clusterpb"
	"github.com/nanomesh/nanomesh/session"
	"github.com/rs/zerolog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"
)

const mdNode = "nanomesh-node"

// cluster is a node's membership and its gRPC traffic with the other nodes.
type cluster struct {
	clusterpb.UnimplementedClusterServer
	n     *Node
	disc  discovery.Discovery
	self  *discovery.Member
	log   zerolog.Logger
	srv   *grpc.Server
	ln    net.Listener
	pins  pins
	unsub func()

	mu      sync.Mutex
	peers   map[string]*peer   // live members' links
	retired map[*peer]struct{} // links of members that left, closed once idle
	links   map[*link]struct{} // gates' links to this node

	draining atomic.Bool
	// nlinks counts running Link handlers; linksIdle, if not nil, is closed
	// when it drops to zero. Guarded by mu. (A WaitGroup would race: gates
	// may open links while Shutdown waits.)
	nlinks    int
	linksIdle chan struct{}
	stop      chan struct{}
	wg        sync.WaitGroup
}

func (c *cluster) start(ctx context.Context) error {
	n := c.n
	c.peers = make(map[string]*peer)
	c.retired = make(map[*peer]struct{})
	c.links = make(map[*link]struct{})
	c.stop = make(chan struct{})
	ln, err := (&net.ListenConfig{}).Listen(ctx, "tcp", n.opts.grpcAddr)
	if err != nil {
		return fmt.Errorf("node: grpc listen: %w", err)
	}
	c.ln = ln
	c.srv = grpc.NewServer(
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: time.Second, PermitWithoutStream: true}),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 5 * time.Second, Timeout: 3 * time.Second}),
	)
	clusterpb.RegisterClusterServer(c.srv, c)
	go func() { _ = c.srv.Serve(ln) }()

	adv := n.opts.advertise
	if adv == "" {
		adv = ln.Addr().String()
	}
	self := &discovery.Member{
		ID: n.opts.id, GRPCAddr: adv, Labels: n.opts.labels,
		Version: Version, StartedAt: time.Now().UTC(),
	}
	for _, svc := range n.reg.Services() {
		ds := discovery.Service{Name: svc.Name}
		for _, h := range svc.Handlers {
			ds.Routes = append(ds.Routes, h.Route)
		}
		self.Services = append(self.Services, ds)
	}
	if n.opts.clientAddrs != nil {
		self.ClientAddrs = n.opts.clientAddrs
	}
	c.unsub = c.disc.Subscribe(c.onEvent)
	if err := c.disc.Register(ctx, self); err != nil {
		c.unsub()
		c.srv.Stop()
		return fmt.Errorf("node: register: %w", err)
	}
	c.self = self
	c.wg.Add(1)
	go c.sweep()
	return nil
}

// onEvent retires the peer of a member that left, and revives it when the
// same incarnation of the member comes back while its link is still open.
func (c *cluster) onEvent(ev discovery.Event) {
	if ev.Member == nil {
		return
	}
	id := ev.Member.ID
	c.mu.Lock()
	defer c.mu.Unlock()
	switch ev.Type {
	case discovery.EventDelete:
		if p := c.peers[id]; p != nil {
			delete(c.peers, id)
			p.retiredAt.Store(time.Now().UnixNano())
			p.retired.Store(true)
			c.retired[p] = struct{}{}
		}
	case discovery.EventPut:
		if c.peers[id] != nil {
			return
		}
		for p := range c.retired {
			if p.id == id && p.incarnation(ev.Member) && p.up.Load() && !p.draining.Load() {
				delete(c.retired, p)
				p.retired.Store(false)
				c.peers[id] = p
				return
			}
		}
	}
}

// sweep expires forwarded requests and closes retired peers once idle.
func (c *cluster) sweep() {
	defer c.wg.Done()
	t := time.NewTicker(c.n.opts.sweep)
	defer t.Stop()
	for {
		select {
		case <-c.stop:
			return
		case now := <-t.C:
			c.mu.Lock()
			live := make([]*peer, 0, len(c.peers))
			for _, p := range c.peers {
				live = append(live, p)
			}
			old := make([]*peer, 0, len(c.retired))
			for p := range c.retired {
				old = append(old, p)
			}
			c.mu.Unlock()
			for _, p := range live {
				p.expire(now)
			}
			for _, p := range old {
				if p.expire(now) && p.closable(now) {
					c.mu.Lock()
					_, still := c.retired[p] // not revived meanwhile
					delete(c.retired, p)
					c.mu.Unlock()
					if still {
						p.close()
					}
				}
			}
		}
	}
}

// peer returns the link to member m, creating it on first use.
func (c *cluster) peer(m *discovery.Member) (*peer, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if p := c.peers[m.ID]; p != nil {
		return p, nil
	}
	conn, err := grpc.NewClient(m.GRPCAddr,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 2 * time.Second, Timeout: 2 * time.Second, PermitWithoutStream: true}),
	)
	if err != nil {
		return nil, fmt.Errorf("node: dial %s: %w", m.ID, err)
	}
	p := newPeer(c, m, conn)
	c.peers[m.ID] = p
	return p, nil
}

// lookup finds a session held by this node: a client of its agent, or a
// remote session of one of its links.
func (c *cluster) lookup(sid int64) *session.Session {
	if c.n.agent != nil {
		if s, ok := c.n.agent.Session(sid); ok {
			return s
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for l := range c.links {
		if rs := l.get(sid); rs != nil {
			return &rs.sess
		}
	}
	return nil
}

// known reports whether any node of the table serves route.
func (c *cluster) known(service, route string) bool {
	for _, m := range c.disc.Table().ByService(service) {
		if servesRoute(m, service, route) {
			return true
		}
	}
	return false
}

// servesRoute reports whether m serves route of service (a member that
// publishes no route list is trusted to serve every route of the service).
func servesRoute(m *discovery.Member, service, route string) bool {
	for _, s := range m.Services {
		if s.Name == service {
			return len(s.Routes) == 0 || slices.Contains(s.Routes, route)
		}
	}
	return false
}

func serviceOf(route string) string {
	if i := strings.IndexByte(route, '.'); i > 0 {
		return route[:i]
	}
	return route
}

// route picks a usable member for s's message to service, honouring the
// session's pin, never self, never exclude.
func (c *cluster) route(s *session.Session, service, route, exclude string) (*discovery.Member, *peer, bool, error) {
	all := c.disc.Table().ByService(service)
	cands := make([]*discovery.Member, 0, len(all))
	c.mu.Lock()
	for _, m := range all {
		if m.ID == c.self.ID || m.ID == exclude || !servesRoute(m, service, route) {
			continue
		}
		if p := c.peers[m.ID]; p != nil && !p.usable() {
			continue
		}
		cands = append(cands, m)
	}
	c.mu.Unlock()
	if len(cands) == 0 {
		return nil, nil, false, fmt.Errorf("%w: %s", errNoRoute, service)
	}
	r, custom := c.n.opts.routers[service]
	sticky := !custom
	var m *discovery.Member
	if sticky {
		if id := c.pins.get(s.ID(), service); id != "" {
			for _, cand := range cands {
				if cand.ID == id {
					m = cand
					break
				}
			}
		}
		r = Random()
	}
	if m == nil {
		m = r(s, service, cands)
	}
	if m == nil {
		return nil, nil, false, fmt.Errorf("%w: %s (router chose none)", errNoRoute, service)
	}
	p, err := c.peer(m)
	return m, p, sticky, err
}

// forward is the dispatcher's Remote hook: it sends a message for a route
// with no local handler to a node that serves it.
func (c *cluster) forward(s *session.Session, j *session.Job) bool {
	service := serviceOf(j.Msg.Route)
	if !c.known(service, j.Msg.Route) {
		return false // no node serves the route: 404
	}
	m, p, sticky, err := c.route(s, service, j.Msg.Route, "")
	if err != nil {
		if j.Msg.Type == message.Request {
			_ = s.ResponseError(j.Msg.ID, message.NewError(message.CodeBadGateway, "%v", err))
		}
		j.Free()
		return true
	}
	c.pins.set(s.ID(), service, m.ID, sticky)
	p.forward(s, service, &j.Msg, j.Detach(), 0)
	j.Free()
	return true
}

// reforward sends a request that a draining backend refused to another
// node of the service, at most maxTries times.
func (c *cluster) reforward(s *session.Session, mid uint64, pd *pending, exclude string) {
	const maxTries = 3
	m, p, sticky, err := c.route(s, pd.service, pd.route, exclude)
	if err != nil || pd.tries >= maxTries {
		_ = s.ResponseError(mid, message.NewError(message.CodeUnavailable, "no node available for %s", pd.service))
		return
	}
	c.pins.set(s.ID(), pd.service, m.ID, sticky)
	p.forward(s, pd.service, &message.Message{Type: message.Request, ID: mid, Route: pd.route}, pd.data, pd.tries+1)
}

func (c *cluster) sessionInfo(s *session.Session) *clusterpb.Session {
	info := &clusterpb.Session{Id: s.ID(), Uid: s.UID()}
	if data := s.Data(); len(data) > 0 {
		info.Data, _ = json.Marshal(data)
	}
	if a := s.RemoteAddr(); a != nil {
		info.RemoteAddr = a.String()
	}
	return info
}

// onClientClose tells the nodes that served s that it ended.
func (c *cluster) onClientClose(s *session.Session) {
	ids := c.pins.drop(s.ID())
	if len(ids) == 0 {
		return
	}
	up := &clusterpb.Upstream{Kind: &clusterpb.Upstream_Closed{Closed: &clusterpb.SessionClosed{SessionId: s.ID()}}}
	c.mu.Lock()
	ps := make([]*peer, 0, len(ids))
	for _, id := range ids {
		if p := c.peers[id]; p != nil {
			ps = append(ps, p)
		}
	}
	c.mu.Unlock()
	for _, p := range ps {
		p.send(up)
	}
}

// deregister removes the node from discovery (revoking its lease) so peers
// stop routing new work to it, and makes it refuse new forwarded requests
// (gates re-route them).
func (c *cluster) deregister(ctx context.Context) error {
	c.draining.Store(true)
	// Tell the gates at once, so they close their links without waiting
	// to see whether the member comes back (see reviveWindow).
	c.mu.Lock()
	links := make([]*link, 0, len(c.links))
	for l := range c.links {
		links = append(links, l)
	}
	c.mu.Unlock()
	for _, l := range links {
		l.drainNotice()
	}
	if err := c.disc.Close(ctx); err != nil {
		return fmt.Errorf("node: deregister: %w", err)
	}
	return nil
}

// waitLinks waits, within ctx and the drain grace, for the gates to close
// their links to this node once they have seen it leave.
func (c *cluster) waitLinks(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, c.n.opts.drainGrace)
	defer cancel()
	c.mu.Lock()
	if c.nlinks == 0 {
		c.mu.Unlock()
		return
	}
	if c.linksIdle == nil {
		c.linksIdle = make(chan struct{})
	}
	idle := c.linksIdle
	c.mu.Unlock()
	select {
	case <-idle:
	case <-ctx.Done():
	}
}

// linkDone counts a Link handler out.
func (c *cluster) linkDone() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.nlinks--; c.nlinks == 0 && c.linksIdle != nil {
		close(c.linksIdle)
		c.linksIdle = nil
	}
}

// shutdown closes the peers and stops the gRPC server.
func (c *cluster) shutdown(ctx context.Context) {
	close(c.stop)
	c.wg.Wait()
	if c.unsub != nil {
		c.unsub()
	}
	c.mu.Lock()
	var all []*peer
	for _, p := range c.peers {
		all = append(all, p)
	}
	for p := range c.retired {
		all = append(all, p)
	}
	c.peers, c.retired = map[string]*peer{}, map[*peer]struct{}{}
	c.mu.Unlock()
	for _, p := range all {
		p.close()
	}
	stopped := make(chan struct{})
	go func() { c.srv.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-ctx.Done():
		c.srv.Stop()
	}
}

// inflight returns the number of forwarded requests waiting for a response.
func (c *cluster) inflight() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, p := range c.peers {
		n += p.inflightLen()
	}
	for p := range c.retired {
		n += p.inflightLen()
	}
	return n
}
