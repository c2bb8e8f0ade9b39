package discovery

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	grpcbackoff "google.golang.org/grpc/backoff"
)

// Defaults of the etcd options.
const (
	DefaultPrefix      = "/nanomesh"
	DefaultLeaseTTL    = 5 * time.Second
	DefaultDialTimeout = 5 * time.Second
)

const (
	backoffMin = 100 * time.Millisecond
	backoffMax = 2 * time.Second
)

// EtcdOption configures NewEtcd.
type EtcdOption func(*etcdOptions)

type etcdOptions struct {
	endpoints   []string
	prefix      string
	dialTimeout time.Duration
	tls         *tls.Config
	username    string
	password    string
	ttl         time.Duration
	log         zerolog.Logger
	client      *clientv3.Client

	beforeWatch func(rev int64) // test hook, called before each watch starts
}

// WithEndpoints sets the etcd endpoints (default "127.0.0.1:2379").
func WithEndpoints(endpoints ...string) EtcdOption {
	return func(o *etcdOptions) { o.endpoints = endpoints }
}

// WithPrefix sets the key prefix under which the cluster lives (default
// "/nanomesh"). Member records are stored under <prefix>/members/<id> and
// node numbers under <prefix>/nums/<n>.
func WithPrefix(prefix string) EtcdOption {
	return func(o *etcdOptions) { o.prefix = prefix }
}

// WithDialTimeout sets the timeout for establishing a connection to etcd
// (default 5 s). It also bounds each list request.
func WithDialTimeout(d time.Duration) EtcdOption {
	return func(o *etcdOptions) { o.dialTimeout = d }
}

// WithTLS makes the client connect to etcd over TLS with the given config.
func WithTLS(c *tls.Config) EtcdOption {
	return func(o *etcdOptions) { o.tls = c }
}

// WithAuth sets the etcd user name and password.
func WithAuth(username, password string) EtcdOption {
	return func(o *etcdOptions) { o.username, o.password = username, password }
}

// WithLeaseTTL sets the TTL of the lease that keeps the member record alive
// (default 5 s, rounded up to whole seconds). A crashed node disappears from
// its peers' tables after about this long. etcd may raise very small TTLs
// to its own minimum.
func WithLeaseTTL(d time.Duration) EtcdOption {
	return func(o *etcdOptions) { o.ttl = d }
}

// WithLogger sets the logger (default zerolog.Nop()).
func WithLogger(l zerolog.Logger) EtcdOption {
	return func(o *etcdOptions) { o.log = l }
}

// WithClient makes Etcd use an existing client instead of dialing one; the
// connection options are then ignored. Close does not close this client.
func WithClient(c *clientv3.Client) EtcdOption {
	return func(o *etcdOptions) { o.client = c }
}

// withBeforeWatch installs a test hook called with the listed revision
// before every watch is opened.
func withBeforeWatch(fn func(rev int64)) EtcdOption {
	return func(o *etcdOptions) { o.beforeWatch = fn }
}

// Etcd is a Discovery backed by etcd.
//
// The local table is built by listing <prefix>/members/ and then watching it
// from the next revision; a compacted or broken watch leads to a new list,
// whose difference with the table is emitted as events, so no change is
// lost. The local member is written with a create-only transaction under a
// lease kept alive in the background; when the lease is lost (revoked,
// expired, or etcd unreachable for longer than the TTL) the node becomes
// non-routable and registers again under a new lease, with backoff, until
// Close. During an etcd outage the table keeps the last known members.
type Etcd struct {
	o         etcdOptions
	cli       *clientv3.Client
	ownClient bool
	log       zerolog.Logger
	ttl       int64 // seconds
	members   string
	nums      string
	hub       *hub

	ctx    context.Context // lifetime, cancelled by Close
	cancel context.CancelFunc
	wg     sync.WaitGroup // watch and keep-alive loops
	relist chan struct{}  // asks the watch loop to list again

	routable atomic.Bool
	regMu    sync.Mutex // serializes Register and Close
	closed   bool       // guarded by regMu

	mu       sync.Mutex // guards the fields below
	self     *Member
	lease    clientv3.LeaseID
	kaCancel context.CancelFunc
	granted  map[clientv3.LeaseID]bool // leases granted by this instance that may still hold our keys

	// Counters, for tests and diagnostics.
	relists     atomic.Int64 // successful lists
	compactions atomic.Int64 // watches that ended with ErrCompacted
	leaseLosses atomic.Int64 // keep-alive channels that closed
}

var _ Discovery = (*Etcd)(nil)

// NewEtcd returns an etcd-backed Discovery. It dials etcd (unless WithClient
// is given) and starts watching the members in the background; it does not
// wait for etcd to answer, so it also succeeds while etcd is down.
func NewEtcd(opts ...EtcdOption) (*Etcd, error) {
	o := etcdOptions{
		endpoints:   []string{"127.0.0.1:2379"},
		prefix:      DefaultPrefix,
		dialTimeout: DefaultDialTimeout,
		ttl:         DefaultLeaseTTL,
		log:         zerolog.Nop(),
	}
	for _, opt := range opts {
		opt(&o)
	}
	d := &Etcd{
		o:       o,
		cli:     o.client,
		log:     o.log.With().Str("component", "discovery").Logger(),
		ttl:     max(1, int64((o.ttl+time.Second-1)/time.Second)),
		hub:     newHub(),
		relist:  make(chan struct{}, 1),
		granted: map[clientv3.LeaseID]bool{},
	}
	prefix := strings.TrimRight(o.prefix, "/")
	d.members, d.nums = prefix+"/members/", prefix+"/nums/"
	if d.cli == nil {
		cli, err := clientv3.New(clientv3.Config{
			Endpoints:   o.endpoints,
			DialTimeout: o.dialTimeout,
			TLS:         o.tls,
			Username:    o.username,
			Password:    o.password,
			Logger:      zap.NewNop(),
			// gRPC's default reconnect backoff grows to 2 minutes; cap it
			// so that nodes find etcd again soon after an outage.
			DialOptions: []grpc.DialOption{grpc.WithConnectParams(grpc.ConnectParams{
				Backoff:           grpcbackoff.Config{BaseDelay: backoffMin, Multiplier: 1.6, Jitter: 0.2, MaxDelay: backoffMax},
				MinConnectTimeout: o.dialTimeout,
			})},
		})
		if err != nil {
			return nil, fmt.Errorf("discovery: etcd client: %w", err)
		}
		d.cli, d.ownClient = cli, true
	}
	d.ctx, d.cancel = context.WithCancel(context.Background())
	d.wg.Add(1)
	go d.watchLoop()
	return d, nil
}

// Client returns the etcd client in use.
func (d *Etcd) Client() *clientv3.Client { return d.cli }

// Table returns the current snapshot. See Discovery.Table.
func (d *Etcd) Table() *Table { return d.hub.table.Load() }

// Subscribe calls fn for every change. See Discovery.Subscribe.
func (d *Etcd) Subscribe(fn func(Event)) (cancel func()) { return d.hub.subscribe(fn) }

// Routable reports whether the local member is registered under a live lease.
func (d *Etcd) Routable() bool { return d.routable.Load() }

// Self returns a copy of the published record, or nil before Register.
func (d *Etcd) Self() *Member {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.self == nil {
		return nil
	}
	return d.self.Clone()
}

// Register publishes self under a new lease and keeps it alive until Close.
// See Discovery.Register. If Register fails, nothing stays registered.
func (d *Etcd) Register(ctx context.Context, self *Member) error {
	if err := self.validate(); err != nil {
		return err
	}
	d.regMu.Lock()
	defer d.regMu.Unlock()
	switch {
	case d.closed:
		return ErrClosed
	case d.Self() != nil:
		return ErrRegistered
	}
	// Abort when either the caller's context or the Etcd itself ends.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	defer context.AfterFunc(d.ctx, cancel)()

	rec := self.Clone()
	if rec.StartedAt.IsZero() {
		rec.StartedAt = time.Now().Round(0)
	}
	d.mu.Lock()
	d.self = rec
	d.mu.Unlock()
	ka, rev, err := d.establish(ctx)
	if err == nil {
		// Wait until the watcher has applied our own record, so that the
		// table includes self when Register returns.
		if err = d.hub.waitRev(ctx, rev); err != nil {
			err = fmt.Errorf("discovery: register %q: waiting for the watch: %w", rec.ID, err)
			d.mu.Lock()
			lease := d.lease
			d.kaCancel()
			d.lease, d.kaCancel = 0, nil
			d.mu.Unlock()
			d.revokeQuietly(lease)
		}
	}
	if err != nil {
		d.mu.Lock()
		d.self = nil
		d.mu.Unlock()
		return err
	}
	cur := d.Self()
	self.Num, self.StartedAt = cur.Num, cur.StartedAt
	d.routable.Store(true)
	d.wg.Add(1)
	go d.keepLoop(ka)
	d.log.Info().Str("id", cur.ID).Uint32("num", cur.Num).Msg("registered")
	return nil
}

// Close revokes the lease, so that peers see the local member leave at once,
// stops the background loops, cancels all subscriptions and closes the
// client if NewEtcd dialed it. ctx bounds the revocation; Close returns its
// error (the lease then expires on its own after its TTL).
func (d *Etcd) Close(ctx context.Context) error {
	d.cancel() // stops keep-alive and watch; aborts a running Register
	d.regMu.Lock()
	defer d.regMu.Unlock()
	if d.closed {
		return nil
	}
	d.closed = true
	d.wg.Wait()
	d.routable.Store(false)
	d.mu.Lock()
	lease := d.lease
	d.mu.Unlock()
	var err error
	if lease != 0 {
		if _, rerr := d.cli.Revoke(ctx, lease); rerr != nil && !errors.Is(rerr, rpctypes.ErrLeaseNotFound) {
			err = fmt.Errorf("discovery: revoke lease on close: %w", rerr)
		}
	}
	d.hub.close()
	if d.ownClient {
		if cerr := d.cli.Close(); cerr != nil && err == nil && !errors.Is(cerr, context.Canceled) {
			err = fmt.Errorf("discovery: close etcd client: %w", cerr)
		}
	}
	return err
}

// establish grants a lease, claims the member key and a node number under
// it and starts keeping the lease alive. It returns the keep-alive channel
// and the revision of the write.
func (d *Etcd) establish(ctx context.Context) (<-chan *clientv3.LeaseKeepAliveResponse, int64, error) {
	g, err := d.cli.Grant(ctx, d.ttl)
	if err != nil {
		return nil, 0, fmt.Errorf("discovery: grant lease: %w", err)
	}
	d.mu.Lock()
	d.granted[g.ID] = true
	d.mu.Unlock()
	rev, err := d.claim(ctx, g.ID)
	if err != nil {
		d.revokeQuietly(g.ID)
		return nil, 0, err
	}
	kctx, kcancel := context.WithCancel(d.ctx)
	ka, err := d.cli.KeepAlive(clientv3.WithRequireLeader(kctx), g.ID)
	if err != nil {
		kcancel()
		d.revokeQuietly(g.ID)
		return nil, 0, fmt.Errorf("discovery: keep lease alive: %w", err)
	}
	d.mu.Lock()
	if d.kaCancel != nil {
		d.kaCancel()
	}
	d.lease, d.kaCancel = g.ID, kcancel
	d.granted = map[clientv3.LeaseID]bool{g.ID: true}
	d.mu.Unlock()
	return ka, rev, nil
}

// claim writes the member record and the smallest free node number (the
// previous one when it is free) in one create-only transaction under lease.
// Keys left by an earlier lease of this instance are removed by revoking
// that lease; a record held by anybody else is a duplicate.
func (d *Etcd) claim(ctx context.Context, lease clientv3.LeaseID) (int64, error) {
	d.mu.Lock()
	rec := d.self.Clone()
	d.mu.Unlock()
	key := d.members + rec.ID
	for range 20 {
		resp, err := d.cli.Get(ctx, d.nums, clientv3.WithPrefix())
		if err != nil {
			return 0, fmt.Errorf("discovery: list node numbers: %w", err)
		}
		taken := make(map[uint32]*mvccpb.KeyValue, len(resp.Kvs))
		for _, kv := range resp.Kvs {
			if n, err := strconv.ParseUint(strings.TrimPrefix(string(kv.Key), d.nums), 10, 32); err == nil {
				taken[uint32(n)] = kv
			}
		}
		if kv := taken[rec.Num]; rec.Num != 0 && kv != nil && d.ours(kv.Lease) {
			if err := d.revokeStale(ctx, kv.Lease); err != nil {
				return 0, err
			}
			continue
		}
		num := rec.Num
		if num == 0 || taken[num] != nil {
			num = 1
			for taken[num] != nil {
				num++
			}
		}
		r := *rec
		r.Num = num
		data, err := json.Marshal(&r)
		if err != nil {
			return 0, fmt.Errorf("discovery: encode member: %w", err)
		}
		numKey := d.nums + strconv.FormatUint(uint64(num), 10)
		tr, err := d.cli.Txn(ctx).If(
			clientv3.Compare(clientv3.CreateRevision(key), "=", 0),
			clientv3.Compare(clientv3.CreateRevision(numKey), "=", 0),
		).Then(
			clientv3.OpPut(key, string(data), clientv3.WithLease(lease)),
			clientv3.OpPut(numKey, rec.ID, clientv3.WithLease(lease)),
		).Else(
			clientv3.OpGet(key),
		).Commit()
		if err != nil {
			return 0, fmt.Errorf("discovery: register %q: %w", rec.ID, err)
		}
		if tr.Succeeded {
			d.mu.Lock()
			d.self.Num = num
			d.mu.Unlock()
			return tr.Header.Revision, nil
		}
		if kvs := tr.Responses[0].GetResponseRange().Kvs; len(kvs) > 0 {
			if !d.ours(kvs[0].Lease) {
				return 0, duplicateError(rec.ID, kvs[0])
			}
			if err := d.revokeStale(ctx, kvs[0].Lease); err != nil {
				return 0, err
			}
		}
		// Otherwise another node claimed the number first: try again.
	}
	return 0, fmt.Errorf("discovery: register %q: could not claim a node number", rec.ID)
}

func duplicateError(id string, kv *mvccpb.KeyValue) error {
	var m Member
	_ = json.Unmarshal(kv.Value, &m)
	return fmt.Errorf("%w: %q is held by a live member (grpc %q, started %s, lease %x)",
		ErrDuplicateID, id, m.GRPCAddr, m.StartedAt.Format(time.RFC3339), kv.Lease)
}

// ours reports whether lease was granted by this instance.
func (d *Etcd) ours(lease int64) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return lease != 0 && d.granted[clientv3.LeaseID(lease)]
}

// revokeStale revokes an earlier lease of this instance, deleting the keys
// it still holds.
func (d *Etcd) revokeStale(ctx context.Context, lease int64) error {
	d.log.Info().Int64("lease", lease).Msg("removing own stale record")
	if _, err := d.cli.Revoke(ctx, clientv3.LeaseID(lease)); err != nil && !errors.Is(err, rpctypes.ErrLeaseNotFound) {
		return fmt.Errorf("discovery: revoke stale lease: %w", err)
	}
	d.mu.Lock()
	delete(d.granted, clientv3.LeaseID(lease))
	d.mu.Unlock()
	return nil
}

// revokeQuietly revokes a lease on a best-effort basis, for cleanup after a
// failure; otherwise the lease expires after its TTL.
func (d *Etcd) revokeQuietly(lease clientv3.LeaseID) {
	if lease == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if _, err := d.cli.Revoke(ctx, lease); err == nil || errors.Is(err, rpctypes.ErrLeaseNotFound) {
		d.mu.Lock()
		delete(d.granted, lease)
		d.mu.Unlock()
	}
}

// keepLoop drains the keep-alive channel; when it closes, the lease is lost
// and the member registers again, with backoff, until Close.
func (d *Etcd) keepLoop(ka <-chan *clientv3.LeaseKeepAliveResponse) {
	defer d.wg.Done()
	for {
		for alive := true; alive; {
			select {
			case <-d.ctx.Done():
				return
			case _, alive = <-ka:
			}
		}
		d.routable.Store(false)
		d.leaseLosses.Add(1)
		d.log.Warn().Msg("lease lost; member is not routable, registering again")
		var bo backoff
		for {
			ctx, cancel := context.WithTimeout(d.ctx, d.opTimeout())
			var err error
			ka, _, err = d.establish(ctx)
			cancel()
			if err == nil {
				break
			}
			if d.ctx.Err() != nil {
				return
			}
			d.log.Warn().Err(err).Msg("registering again failed")
			if !bo.sleep(d.ctx) {
				return
			}
		}
		d.routable.Store(true)
		d.requestRelist()
		self := d.Self()
		d.log.Info().Str("id", self.ID).Uint32("num", self.Num).Msg("registered again")
	}
}

func (d *Etcd) opTimeout() time.Duration { return max(d.o.dialTimeout, time.Second) }

func (d *Etcd) requestRelist() {
	select {
	case d.relist <- struct{}{}:
	default:
	}
}

var (
	errRelist      = errors.New("re-list requested")
	errWatchClosed = errors.New("watch channel closed")
)

// watchLoop lists the members and watches them, listing again whenever the
// watch ends, until Close.
func (d *Etcd) watchLoop() {
	defer d.wg.Done()
	var bo backoff
	for d.ctx.Err() == nil {
		rev, err := d.list()
		if err != nil {
			if d.ctx.Err() == nil {
				d.log.Warn().Err(err).Msg("listing members failed; keeping the last known table")
			}
			if !bo.sleep(d.ctx) {
				return
			}
			continue
		}
		if d.o.beforeWatch != nil {
			d.o.beforeWatch(rev)
		}
		progressed, err := d.watch(rev + 1)
		if progressed {
			bo.reset()
		}
		switch {
		case d.ctx.Err() != nil:
			return
		case errors.Is(err, rpctypes.ErrCompacted):
			d.compactions.Add(1)
			d.log.Info().Err(err).Msg("watch compacted; listing again")
		case errors.Is(err, errRelist):
		default:
			d.log.Warn().Err(err).Msg("watch ended; listing again")
			if !bo.sleep(d.ctx) {
				return
			}
		}
	}
}

// list reads all members and applies them as a full snapshot.
func (d *Etcd) list() (int64, error) {
	ctx, cancel := context.WithTimeout(d.ctx, d.opTimeout())
	defer cancel()
	resp, err := d.cli.Get(ctx, d.members, clientv3.WithPrefix())
	if err != nil {
		return 0, fmt.Errorf("discovery: list members: %w", err)
	}
	members := make(map[string]*Member, len(resp.Kvs))
	mods := make(map[string]int64, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		if m := d.decode(kv); m != nil {
			members[m.ID], mods[m.ID] = m, kv.ModRevision
		}
	}
	d.hub.reset(resp.Header.Revision, members, mods)
	d.relists.Add(1)
	return resp.Header.Revision, nil
}

// watch applies the changes from revision rev on, until the watch ends or a
// new list is requested. progressed reports whether any response arrived.
func (d *Etcd) watch(rev int64) (progressed bool, err error) {
	ctx, cancel := context.WithCancel(clientv3.WithRequireLeader(d.ctx))
	defer cancel()
	wch := d.cli.Watch(ctx, d.members, clientv3.WithPrefix(), clientv3.WithPrevKV(), clientv3.WithRev(rev))
	for {
		select {
		case <-d.relist:
			return progressed, errRelist
		case resp, ok := <-wch:
			if !ok {
				return progressed, errWatchClosed
			}
			if err := resp.Err(); err != nil {
				return progressed, err
			}
			progressed = true
			changes := make([]change, 0, len(resp.Events))
			for _, ev := range resp.Events {
				id := strings.TrimPrefix(string(ev.Kv.Key), d.members)
				switch ev.Type {
				case mvccpb.PUT:
					if m := d.decode(ev.Kv); m != nil {
						changes = append(changes, change{id: id, m: m, mod: ev.Kv.ModRevision})
					}
				case mvccpb.DELETE:
					changes = append(changes, change{id: id, mod: ev.Kv.ModRevision})
				}
			}
			d.hub.apply(resp.Header.Revision, changes)
		}
	}
}

// decode parses a member record; invalid records are logged and skipped.
func (d *Etcd) decode(kv *mvccpb.KeyValue) *Member {
	id := strings.TrimPrefix(string(kv.Key), d.members)
	m := new(Member)
	if err := json.Unmarshal(kv.Value, m); err != nil || m.ID != id {
		d.log.Warn().Err(err).Str("key", string(kv.Key)).Msg("ignoring invalid member record")
		return nil
	}
	return m
}

// backoff sleeps exponentially longer, from backoffMin up to backoffMax,
// with jitter.
type backoff struct{ next time.Duration }

func (b *backoff) reset() { b.next = 0 }

// sleep waits for the next delay; it returns false when ctx ends first.
func (b *backoff) sleep(ctx context.Context) bool {
	if b.next == 0 {
		b.next = backoffMin
	}
	d := b.next/2 + rand.N(b.next/2+1)
	b.next = min(2*b.next, backoffMax)
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}
