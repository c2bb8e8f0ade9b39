// Package discovery holds member records and cluster membership.
//
// Every node of a nanomesh cluster publishes a Member record describing
// itself (gRPC address, client addresses, services and routes, labels) and
// keeps a local, immutable snapshot of all live members, the Table, which the
// router reads on the hot path without locks.
//
// Two implementations of Discovery are provided: Etcd, which keeps the
// records in etcd under leases (see NewEtcd), and Memory, which shares the
// records between several nodes of one process (see NewMemoryCluster).
package discovery

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"
)

// Errors returned by Discovery implementations. They are wrapped, so test
// for them with errors.Is.
var (
	// ErrDuplicateID means that a live member already uses the node id
	// passed to Register. The existing record is never overwritten.
	ErrDuplicateID = errors.New("discovery: duplicate member id")
	// ErrClosed means that the Discovery has been closed.
	ErrClosed = errors.New("discovery: closed")
	// ErrRegistered means that Register was called twice.
	ErrRegistered = errors.New("discovery: already registered")
)

// Service describes one service a member serves and, optionally, the routes
// of that service.
type Service struct {
	Name   string   `json:"name"`
	Routes []string `json:"routes,omitempty"`
}

// Member is the record a node publishes about itself.
type Member struct {
	// ID is the node id, unique among live members.
	ID string `json:"id"`
	// Num is the node number, unique among live members and claimed by
	// Register. Cluster-wide session ids are derived from it.
	Num uint32 `json:"num"`
	// GRPCAddr is the address of the node's gRPC service for its peers.
	GRPCAddr string `json:"grpcAddr"`
	// ClientAddrs maps a transport ("ws", "tcp", ...) to the address on
	// which the node accepts clients.
	ClientAddrs map[string]string `json:"clientAddrs,omitempty"`
	// Services lists the services the node serves.
	Services []Service `json:"services,omitempty"`
	// Labels are free-form attributes used by custom routing policies.
	Labels map[string]string `json:"labels,omitempty"`
	// Version is the application version of the node.
	Version string `json:"version,omitempty"`
	// StartedAt is the time the node started. Register sets it to the
	// current time when it is zero.
	StartedAt time.Time `json:"startedAt"`
}

// Serves reports whether the member serves the named service.
func (m *Member) Serves(service string) bool {
	for i := range m.Services {
		if m.Services[i].Name == service {
			return true
		}
	}
	return false
}

// Clone returns a deep copy of the member.
func (m *Member) Clone() *Member {
	c := *m
	if m.ClientAddrs != nil {
		c.ClientAddrs = make(map[string]string, len(m.ClientAddrs))
		for k, v := range m.ClientAddrs {
			c.ClientAddrs[k] = v
		}
	}
	if m.Labels != nil {
		c.Labels = make(map[string]string, len(m.Labels))
		for k, v := range m.Labels {
			c.Labels[k] = v
		}
	}
	if m.Services != nil {
		c.Services = make([]Service, len(m.Services))
		for i, s := range m.Services {
			c.Services[i] = Service{Name: s.Name, Routes: slices.Clone(s.Routes)}
		}
	}
	return &c
}

// validate checks the fields Register relies on.
func (m *Member) validate() error {
	if m == nil {
		return errors.New("discovery: nil member")
	}
	if m.ID == "" || strings.ContainsAny(m.ID, "/ \t\n") {
		return fmt.Errorf("discovery: invalid member id %q", m.ID)
	}
	return nil
}

// EventType is the kind of a membership change.
type EventType uint8

const (
	// EventPut means a member joined or its record changed.
	EventPut EventType = iota + 1
	// EventDelete means a member left, was deregistered or its lease expired.
	EventDelete
)

// String returns "put" or "delete".
func (t EventType) String() string {
	switch t {
	case EventPut:
		return "put"
	case EventDelete:
		return "delete"
	}
	return fmt.Sprintf("EventType(%d)", uint8(t))
}

// Event is one membership change. For EventDelete, Member is the last known
// record of the member that left. Members are shared and must not be
// modified.
type Event struct {
	Type   EventType
	Member *Member
}

// Table is an immutable snapshot of the live members, including the local
// node once it is registered. Tables and the members they hold are shared
// between goroutines and must not be modified.
type Table struct {
	// Rev is the revision of the snapshot: the etcd revision for Etcd, a
	// counter for Memory. It only tells newer snapshots from older ones.
	Rev int64
	// Members maps member ids to members.
	Members map[string]*Member

	mods      map[string]int64     // member id -> revision of its last change
	byService map[string][]*Member // service name -> members sorted by id
}

func newTable(rev int64, members map[string]*Member, mods map[string]int64) *Table {
	t := &Table{Rev: rev, Members: members, mods: mods, byService: map[string][]*Member{}}
	for _, m := range members {
		for _, s := range m.Services {
			if l := t.byService[s.Name]; len(l) == 0 || l[len(l)-1] != m {
				t.byService[s.Name] = append(l, m)
			}
		}
	}
	for _, l := range t.byService {
		sort.Slice(l, func(i, j int) bool { return l[i].ID < l[j].ID })
	}
	return t
}

// Get returns the member with the given id, or nil.
func (t *Table) Get(id string) *Member { return t.Members[id] }

// Len returns the number of members.
func (t *Table) Len() int { return len(t.Members) }

// ByService returns the members that serve the named service, sorted by id.
// The slice is shared by all callers and must not be modified.
func (t *Table) ByService(name string) []*Member { return t.byService[name] }

// sortedIDs returns the member ids in order.
func (t *Table) sortedIDs() []string {
	ids := make([]string, 0, len(t.Members))
	for id := range t.Members {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	return ids
}

// Discovery publishes the local member and tracks the live members of the
// cluster. All methods are safe for concurrent use.
type Discovery interface {
	// Register publishes self and keeps it alive until Close. It fails with
	// ErrDuplicateID (wrapped) when a live member already has self.ID, and
	// with ErrRegistered when called twice. It claims a node number and
	// stores it in self.Num (a non-zero self.Num is tried first). When
	// Register returns nil, Table already includes self. Register keeps its
	// own copy of self: later changes to self are not published.
	Register(ctx context.Context, self *Member) error
	// Self returns a copy of the record currently published for the local
	// node, or nil before Register. Its Num can change if the registration
	// was lost and its number was taken by another node meanwhile.
	Self() *Member
	// Table returns the current snapshot. It never returns nil and is
	// lock-free (an atomic pointer load), so it is safe on hot paths.
	Table() *Table
	// Subscribe calls fn for every membership change, in order. fn first
	// receives one EventPut per member of the current table (sorted by id),
	// then every later change. fn runs on a goroutine owned by the
	// subscription, one call at a time, so a slow fn delays only its own
	// events (they are queued without bound). Calling cancel stops the
	// subscription and drops its queued events: after cancel returns, fn is
	// called at most once more (a call that was already starting or
	// running). cancel does not wait for fn and may be called from within
	// fn. Close cancels all subscriptions.
	Subscribe(fn func(Event)) (cancel func())
	// Routable reports whether the local member is currently registered
	// under a live lease, that is whether peers can see it.
	Routable() bool
	// Close deregisters the local member (so peers see it leave within one
	// watch event), stops watching and cancels all subscriptions. Closing
	// twice is a no-op. ctx bounds the deregistration.
	Close(ctx context.Context) error
}
