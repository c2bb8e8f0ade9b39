package node

import (
	"hash/fnv"
	"math/rand/v2"
	"sync"

	"github.com/nanomesh/nanomesh/discovery"
	"github.com/nanomesh/nanomesh/session"
)

// Router picks the node that serves a session's message for service among
// the live members that serve it (never empty, sorted by id). Members carry
// their labels for custom choices.
type Router func(s *session.Session, service string, members []*discovery.Member) *discovery.Member

// Random picks a member at random.
func Random() Router {
	return func(_ *session.Session, _ string, ms []*discovery.Member) *discovery.Member {
		return ms[rand.IntN(len(ms))]
	}
}

// ConsistentHash picks a member by rendezvous hashing of the session's UID
// (its id before Bind): a user keeps its node while that node lives, and only
// the users of a node that leaves move.
func ConsistentHash() Router {
	return func(s *session.Session, _ string, ms []*discovery.Member) *discovery.Member {
		key := s.UID()
		if key == 0 {
			key = s.ID()
		}
		var best *discovery.Member
		var bestScore uint64
		for _, m := range ms {
			h := fnv.New64a()
			var b [8]byte
			for i := range b {
				b[i] = byte(key >> (8 * i))
			}
			_, _ = h.Write(b[:])
			_, _ = h.Write([]byte(m.ID))
			if sc := h.Sum64(); best == nil || sc > bestScore {
				best, bestScore = m, sc
			}
		}
		return best
	}
}

// pins remembers, per session, which node serves each service (sticky
// routing) and which nodes have seen the session (to tell them when it ends).
type pins struct {
	mu sync.Mutex
	m  map[int64]*sessionPins
}

type sessionPins struct {
	byService map[string]string
	served    map[string]struct{}
}

func (p *pins) get(sid int64, service string) string {
	p.mu.Lock()
	defer p.mu.Unlock()
	if sp := p.m[sid]; sp != nil {
		return sp.byService[service]
	}
	return ""
}

func (p *pins) set(sid int64, service, member string, sticky bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.m == nil {
		p.m = make(map[int64]*sessionPins)
	}
	sp := p.m[sid]
	if sp == nil {
		sp = &sessionPins{byService: make(map[string]string, 1), served: make(map[string]struct{}, 1)}
		p.m[sid] = sp
	}
	if sticky {
		sp.byService[service] = member
	}
	sp.served[member] = struct{}{}
}

// unpin forgets member for sid's service (it failed or left).
func (p *pins) unpin(sid int64, service, member string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if sp := p.m[sid]; sp != nil && sp.byService[service] == member {
		delete(sp.byService, service)
	}
}

// drop forgets sid and returns the members that served it.
func (p *pins) drop(sid int64) []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	sp := p.m[sid]
	if sp == nil {
		return nil
	}
	delete(p.m, sid)
	out := make([]string, 0, len(sp.served))
	for id := range sp.served {
		out = append(out, id)
	}
	return out
}

func (p *pins) len() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.m)
}
