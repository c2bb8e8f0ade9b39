package discovery

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

// MemoryCluster is an in-process registry shared by several Memory nodes, so
// that a multi-node cluster can run in one process without etcd. Its zero
// value is not usable; create it with NewMemoryCluster.
type MemoryCluster struct {
	mu      sync.Mutex
	rev     int64
	entries map[string]*memEntry
	nodes   map[*Memory]struct{}
}

type memEntry struct {
	m     *Member
	mod   int64
	owner *Memory
}

// NewMemoryCluster returns an empty in-process cluster.
func NewMemoryCluster() *MemoryCluster {
	return &MemoryCluster{entries: map[string]*memEntry{}, nodes: map[*Memory]struct{}{}}
}

// NewMemory returns a Memory discovery on a cluster of its own, for a single
// node.
func NewMemory() *Memory { return NewMemoryCluster().Join() }

// Join returns a new node of the cluster. Its table starts with the members
// already registered.
func (c *MemoryCluster) Join() *Memory {
	d := &Memory{c: c, hub: newHub()}
	c.mu.Lock()
	defer c.mu.Unlock()
	members := make(map[string]*Member, len(c.entries))
	mods := make(map[string]int64, len(c.entries))
	for id, e := range c.entries {
		members[id], mods[id] = e.m, e.mod
	}
	d.hub.reset(c.rev, members, mods)
	c.nodes[d] = struct{}{}
	return d
}

// Evict removes the member with the given id as if its node had crashed and
// its lease had expired: peers see it leave and its node becomes
// non-routable for good. It reports whether the member was registered.
func (c *MemoryCluster) Evict(id string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	e := c.entries[id]
	if e == nil {
		return false
	}
	e.owner.routable.Store(false)
	c.removeLocked(id)
	return true
}

// broadcastLocked sends one change to every node. c.mu must be held, which
// keeps the order of changes the same on every node.
func (c *MemoryCluster) broadcastLocked(ch change) {
	for n := range c.nodes {
		n.hub.apply(c.rev, []change{ch})
	}
}

func (c *MemoryCluster) removeLocked(id string) {
	delete(c.entries, id)
	c.rev++
	c.broadcastLocked(change{id: id, mod: c.rev})
}

// Memory is a Discovery whose records live in a MemoryCluster. Changes are
// applied to every node's table synchronously, in the same order.
type Memory struct {
	c        *MemoryCluster
	hub      *hub
	routable atomic.Bool
	self     *Member // guarded by c.mu
	closed   bool    // guarded by c.mu
}

var _ Discovery = (*Memory)(nil)

// Register publishes self. See Discovery.Register.
func (d *Memory) Register(ctx context.Context, self *Member) error {
	if err := self.validate(); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	c := d.c
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case d.closed:
		return ErrClosed
	case d.self != nil:
		return ErrRegistered
	case c.entries[self.ID] != nil:
		return fmt.Errorf("%w: %q is already registered", ErrDuplicateID, self.ID)
	}
	rec := self.Clone()
	if rec.StartedAt.IsZero() {
		rec.StartedAt = time.Now().Round(0)
	}
	used := make(map[uint32]bool, len(c.entries))
	for _, e := range c.entries {
		used[e.m.Num] = true
	}
	if rec.Num == 0 || used[rec.Num] {
		rec.Num = 1
		for used[rec.Num] {
			rec.Num++
		}
	}
	c.rev++
	c.entries[rec.ID] = &memEntry{m: rec, mod: c.rev, owner: d}
	d.self = rec
	d.routable.Store(true)
	c.broadcastLocked(change{id: rec.ID, m: rec, mod: c.rev})
	self.Num, self.StartedAt = rec.Num, rec.StartedAt
	return nil
}

// Self returns a copy of the registered record, or nil.
func (d *Memory) Self() *Member {
	d.c.mu.Lock()
	defer d.c.mu.Unlock()
	if d.self == nil {
		return nil
	}
	return d.self.Clone()
}

// Table returns the current snapshot. See Discovery.Table.
func (d *Memory) Table() *Table { return d.hub.table.Load() }

// Subscribe calls fn for every change. See Discovery.Subscribe.
func (d *Memory) Subscribe(fn func(Event)) (cancel func()) { return d.hub.subscribe(fn) }

// Routable reports whether the node is registered and not evicted.
func (d *Memory) Routable() bool { return d.routable.Load() }

// Close deregisters the node and cancels all subscriptions.
func (d *Memory) Close(context.Context) error {
	c := d.c
	c.mu.Lock()
	if d.closed {
		c.mu.Unlock()
		return nil
	}
	d.closed = true
	d.routable.Store(false)
	delete(c.nodes, d)
	if d.self != nil {
		if e := c.entries[d.self.ID]; e != nil && e.owner == d {
			c.removeLocked(d.self.ID)
		}
	}
	c.mu.Unlock()
	d.hub.close()
	return nil
}
