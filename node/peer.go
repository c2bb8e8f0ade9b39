package node

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nanomesh/nanomesh/discovery"
	"github.com/nanomesh/nanomesh/message"
	"github.com/nanomesh/nanomesh/node/clusterpb"
	"github.com/nanomesh/nanomesh/session"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
)

// peer is this node's side of the link to one backend: a long-lived gRPC
// connection, one Link stream, a send goroutine and a receive goroutine, and
// the table of forwarded requests waiting for a response.
type peer struct {
	c    *cluster
	id   string
	conn *grpc.ClientConn
	cli  clusterpb.ClusterClient

	sendq chan *clusterpb.Upstream
	up    atomic.Bool // a Link stream is open
	// retired: the member left the table; no new work, close once idle.
	retired atomic.Bool
	// retiredAt (unix ns) is when the member left; a retired peer whose
	// link is healthy is kept for reviveWindow in case the same incarnation
	// of the member comes back (its record re-created after an etcd outage).
	retiredAt atomic.Int64
	// draining: the backend announced its graceful departure on the link.
	draining atomic.Bool
	addr     string    // the member's gRPC address
	started  time.Time // the member's StartedAt: its incarnation
	closed   chan struct{}
	once     sync.Once

	mu       sync.Mutex
	inflight map[reqKey]*pending
}

type reqKey struct {
	sid int64
	mid uint64
}

type pending struct {
	s        *session.Session
	service  string
	route    string
	data     []byte
	deadline time.Time
	tries    int
}

func newPeer(c *cluster, m *discovery.Member, conn *grpc.ClientConn) *peer {
	p := &peer{
		c: c, id: m.ID, addr: m.GRPCAddr, started: m.StartedAt, conn: conn, cli: clusterpb.NewClusterClient(conn),
		sendq:    make(chan *clusterpb.Upstream, 4096),
		closed:   make(chan struct{}),
		inflight: make(map[reqKey]*pending),
	}
	p.up.Store(true) // optimistic until a stream fails
	go p.run()
	return p
}

// usable reports whether new work may be routed to p.
func (p *peer) usable() bool { return p.up.Load() && !p.retired.Load() && !p.draining.Load() }

// reviveWindow is how long a retired peer with a healthy link stays open for
// its member to come back: an etcd outage makes members re-register, which
// deletes and re-creates their records; closing the link meanwhile would
// make the backend release every session of this gate.
const reviveWindow = 2 * time.Second

// closable reports whether a retired, idle peer may be closed now: its
// backend is leaving or unreachable, or it stayed away too long.
func (p *peer) closable(now time.Time) bool {
	return p.draining.Load() || !p.up.Load() || now.Sub(time.Unix(0, p.retiredAt.Load())) >= reviveWindow
}

// incarnation reports whether m is the member p was created for (same
// address, same start), as opposed to a restarted node with the same id.
func (p *peer) incarnation(m *discovery.Member) bool {
	return p.addr == m.GRPCAddr && p.started.Equal(m.StartedAt)
}

// forward queues a request or notify for the backend. A request is tracked
// until its response, a failure of the link (502) or its deadline (504).
func (p *peer) forward(s *session.Session, service string, m *message.Message, data []byte, tries int) {
	up := &clusterpb.Upstream{Kind: &clusterpb.Upstream_Forward{Forward: &clusterpb.Forward{
		Session: p.c.sessionInfo(s), Mid: m.ID, Route: m.Route, Data: data,
	}}}
	if m.ID != 0 {
		p.mu.Lock()
		p.inflight[reqKey{s.ID(), m.ID}] = &pending{
			s: s, service: service, route: m.Route, data: data,
			deadline: time.Now().Add(p.c.n.opts.requestTimeout), tries: tries,
		}
		p.mu.Unlock()
	}
	select {
	case p.sendq <- up:
	case <-p.closed:
		p.fail(reqKey{s.ID(), m.ID}, message.CodeBadGateway, "node unreachable")
	}
}

// send queues a message that needs no tracking (session-closed notices).
func (p *peer) send(up *clusterpb.Upstream) {
	select {
	case p.sendq <- up:
	case <-p.closed:
	default: // the link is hopelessly behind; the backend cleans up when the link ends
	}
}

func (p *peer) run() {
	backoff := 50 * time.Millisecond
	for {
		err := p.stream()
		p.up.Store(false)
		p.failAll(message.CodeBadGateway, "node unreachable")
		p.dropQueued()
		if err != nil {
			p.c.log.Debug().Err(err).Str("peer", p.id).Msg("link down")
		}
		select {
		case <-p.closed:
			return
		case <-time.After(backoff):
			backoff = min(2*backoff, 2*time.Second)
		}
		if p.retired.Load() {
			p.close()
			return
		}
	}
}

// stream runs one Link stream until it fails or the peer is closed.
func (p *peer) stream() error {
	ctx, cancel := context.WithCancel(metadata.AppendToOutgoingContext(context.Background(), mdNode, p.c.self.ID))
	defer cancel()
	st, err := p.cli.Link(ctx, grpc.WaitForReady(false))
	if err != nil {
		return err
	}
	p.up.Store(true)
	errc := make(chan error, 1)
	go func() {
		for {
			down, err := st.Recv()
			if err != nil {
				errc <- err
				return
			}
			p.deliver(down)
		}
	}()
	for {
		select {
		case <-p.closed:
			_ = st.CloseSend()
			return nil
		case err := <-errc:
			return err
		case up := <-p.sendq:
			if err := st.Send(up); err != nil {
				if f := up.GetForward(); f != nil && f.Mid != 0 {
					p.fail(reqKey{f.Session.GetId(), f.Mid}, message.CodeBadGateway, "node unreachable")
				}
				return err
			}
		}
	}
}

// deliver applies one message from the backend to the gate's sessions.
func (p *peer) deliver(down *clusterpb.Downstream) {
	c := p.c
	switch k := down.Kind.(type) {
	case *clusterpb.Downstream_Response:
		r := k.Response
		if r.Mid == 0 {
			if r.Retry { // drain notice: the backend is leaving
				p.draining.Store(true)
			}
			return
		}
		key := reqKey{r.SessionId, r.Mid}
		p.mu.Lock()
		pd := p.inflight[key]
		delete(p.inflight, key)
		p.mu.Unlock()
		if pd == nil {
			return // already answered: timed out or failed
		}
		s := pd.s
		if r.Retry {
			// The backend is draining and did not run the handler: go elsewhere.
			c.pins.unpin(s.ID(), pd.service, p.id)
			c.reforward(s, r.Mid, pd, p.id)
			return
		}
		_ = s.Entity().Response(r.Mid, r.Data, r.Error)
	case *clusterpb.Downstream_Push:
		for _, id := range k.Push.SessionIds {
			if s := c.lookup(id); s != nil {
				_ = s.Entity().Push(k.Push.Route, k.Push.Data)
			}
		}
	case *clusterpb.Downstream_Kick:
		if s := c.lookup(k.Kick.SessionId); s != nil {
			_ = s.Kick(k.Kick.Reason)
		}
	case *clusterpb.Downstream_Close:
		if s := c.lookup(k.Close.SessionId); s != nil {
			_ = s.Close()
		}
	case *clusterpb.Downstream_Bind:
		if s := c.lookup(k.Bind.SessionId); s != nil {
			_ = s.Bind(k.Bind.Uid)
		}
	}
}

// dropQueued discards messages queued for a stream that failed; their
// requests were answered by failAll.
func (p *peer) dropQueued() {
	for {
		select {
		case <-p.sendq:
		default:
			return
		}
	}
}

func (p *peer) fail(key reqKey, code int, msg string) {
	p.mu.Lock()
	pd := p.inflight[key]
	delete(p.inflight, key)
	p.mu.Unlock()
	if pd != nil {
		p.c.pins.unpin(pd.s.ID(), pd.service, p.id)
		_ = pd.s.ResponseError(key.mid, message.NewError(code, "%s: %s", msg, p.id))
	}
}

// failAll answers every request waiting on p with code.
func (p *peer) failAll(code int, msg string) {
	p.mu.Lock()
	all := p.inflight
	p.inflight = make(map[reqKey]*pending)
	p.mu.Unlock()
	for key, pd := range all {
		p.c.pins.unpin(pd.s.ID(), pd.service, p.id)
		_ = pd.s.ResponseError(key.mid, message.NewError(code, "%s: %s", msg, p.id))
	}
}

// expire answers requests past their deadline with 504 and reports whether
// the peer has nothing in flight.
func (p *peer) expire(now time.Time) (idle bool) {
	var late []reqKey
	p.mu.Lock()
	for key, pd := range p.inflight {
		if now.After(pd.deadline) {
			late = append(late, key)
		}
	}
	idle = len(p.inflight) == len(late)
	p.mu.Unlock()
	for _, key := range late {
		p.fail(key, message.CodeTimeout, "timeout waiting for")
	}
	return idle
}

func (p *peer) inflightLen() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.inflight)
}

func (p *peer) close() {
	p.once.Do(func() {
		close(p.closed)
		_ = p.conn.Close()
	})
}

var errNoRoute = errors.New("node: no node serves the route")
