package agent

import (
	"sync"

	"github.com/nanomesh/nanomesh/session"
)

const shards = 64

// sessionTable maps session ids to established connections, sharded to keep
// lock contention low at high connect rates.
type sessionTable struct {
	shards [shards]struct {
		mu sync.RWMutex
		m  map[int64]*conn
	}
}

func (t *sessionTable) init() {
	for i := range t.shards {
		t.shards[i].m = make(map[int64]*conn)
	}
}

func (t *sessionTable) shard(id int64) int { return int(uint64(id) % shards) }

func (t *sessionTable) put(c *conn) {
	sh := &t.shards[t.shard(c.sess.ID())]
	sh.mu.Lock()
	sh.m[c.sess.ID()] = c
	sh.mu.Unlock()
}

func (t *sessionTable) del(c *conn) {
	sh := &t.shards[t.shard(c.sess.ID())]
	sh.mu.Lock()
	if sh.m[c.sess.ID()] == c {
		delete(sh.m, c.sess.ID())
	}
	sh.mu.Unlock()
}

func (t *sessionTable) get(id int64) *conn {
	sh := &t.shards[t.shard(id)]
	sh.mu.RLock()
	c := sh.m[id]
	sh.mu.RUnlock()
	return c
}

func (t *sessionTable) len() int {
	n := 0
	for i := range t.shards {
		t.shards[i].mu.RLock()
		n += len(t.shards[i].m)
		t.shards[i].mu.RUnlock()
	}
	return n
}

func (t *sessionTable) rangeAll(fn func(*session.Session) bool) {
	for i := range t.shards {
		sh := &t.shards[i]
		sh.mu.RLock()
		cs := make([]*conn, 0, len(sh.m))
		for _, c := range sh.m {
			cs = append(cs, c)
		}
		sh.mu.RUnlock()
		for _, c := range cs {
			if !fn(&c.sess) {
				return
			}
		}
	}
}
