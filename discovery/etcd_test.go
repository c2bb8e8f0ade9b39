package discovery

import (
	"context"
	"errors"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/nanomesh/nanomesh/discovery/embedded"
)

func newClient(t *testing.T, srv *embedded.Server) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: srv.Endpoints(), DialTimeout: 2 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

func leaseOf(t *testing.T, cli *clientv3.Client, id string) clientv3.LeaseID {
	t.Helper()
	resp, err := cli.Get(testCtx(t), DefaultPrefix+"/members/"+id)
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("get member %q: %v %v", id, resp, err)
	}
	return clientv3.LeaseID(resp.Kvs[0].Lease)
}

func TestEtcdMembership(t *testing.T) {
	ctx := testCtx(t)
	srv := startEtcd(t)
	a, b, c := newNode(t, srv), newNode(t, srv), newNode(t, srv)
	recB, cancel := record(b)
	defer cancel()

	ma := member("a", "chat", "room")
	if err := a.Register(ctx, ma); err != nil {
		t.Fatal(err)
	}
	if !a.Routable() || a.Table().Get("a") == nil {
		t.Fatal("a is not routable or not in its own table after Register")
	}
	if err := a.Register(ctx, member("a2")); !errors.Is(err, ErrRegistered) {
		t.Fatalf("second Register: %v", err)
	}
	waitFor(t, "b to see a", has(b, "a"))
	if got := b.Table().Get("a"); got.GRPCAddr != ma.GRPCAddr || !got.Serves("chat") || got.Num != ma.Num {
		t.Fatalf("b sees %+v, registered %+v", got, ma)
	}

	// A duplicate id is refused and never overwrites the live record.
	err := c.Register(ctx, member("a"))
	if !errors.Is(err, ErrDuplicateID) {
		t.Fatalf("duplicate Register: %v", err)
	}
	t.Logf("duplicate: %v", err)
	if c.Routable() || c.Self() != nil {
		t.Fatal("c is routable after a refused Register")
	}
	if got := b.Table().Get("a"); got.GRPCAddr != ma.GRPCAddr {
		t.Fatal("duplicate overwrote the record")
	}

	mb := member("b", "chat")
	if err := b.Register(ctx, mb); err != nil {
		t.Fatal(err)
	}
	mc := member("c")
	if err := c.Register(ctx, mc); err != nil {
		t.Fatalf("c registers under its own id after the refusal: %v", err)
	}
	if ma.Num == 0 || mb.Num == 0 || mc.Num == 0 || ma.Num == mb.Num || mb.Num == mc.Num || ma.Num == mc.Num {
		t.Fatalf("node numbers not unique: a=%d b=%d c=%d", ma.Num, mb.Num, mc.Num)
	}
	waitFor(t, "a to see b and c", func() bool { return a.Table().Len() == 3 })
	if l := a.Table().ByService("chat"); len(l) != 2 || l[0].ID != "a" || l[1].ID != "b" {
		t.Fatalf("ByService(chat) = %v", l)
	}

	// Close revokes the lease: the peer sees the delete long before the TTL.
	start := time.Now()
	if err := a.Close(ctx); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "b to drop a", hasNot(b, "a"))
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("delete seen after %v, the lease TTL is %v", d, DefaultLeaseTTL)
	}
	waitFor(t, "b's events "+recB.String(), recB.contains("put:a", "delete:a"))
	if err := a.Register(ctx, member("a")); !errors.Is(err, ErrClosed) {
		t.Fatalf("Register after Close: %v", err)
	}

	// The freed number is reused by the next node.
	d := newNode(t, srv)
	md := member("d")
	if err := d.Register(ctx, md); err != nil {
		t.Fatal(err)
	}
	if md.Num != ma.Num {
		t.Fatalf("d got number %d, want the freed %d", md.Num, ma.Num)
	}
}

func TestEtcdWatchCompacted(t *testing.T) {
	ctx := testCtx(t)
	srv := startEtcd(t)
	cli := newClient(t, srv)

	var pause atomic.Bool
	paused, resume := make(chan int64), make(chan struct{})
	a := newNode(t, srv, withBeforeWatch(func(rev int64) {
		if pause.CompareAndSwap(true, false) {
			paused <- rev
			<-resume
		}
	}))
	x := newNode(t, srv)
	for _, n := range []struct {
		d  *Etcd
		id string
	}{{a, "a"}, {x, "x"}} {
		if err := n.d.Register(ctx, member(n.id)); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "a to see x", has(a, "x"))
	rec, cancel := record(a)
	defer cancel()

	// Hold a's watcher between its list and its watch, delete x and
	// compact past the delete: the watch from list+1 is then compacted.
	pause.Store(true)
	a.requestRelist()
	rev := <-paused
	if err := x.Close(ctx); err != nil {
		t.Fatal(err)
	}
	put, err := cli.Put(ctx, "/unrelated", "v")
	if err != nil {
		t.Fatal(err)
	}
	if put.Header.Revision <= rev+1 {
		t.Fatalf("no revision to compact: listed %d, now %d", rev, put.Header.Revision)
	}
	if _, err := cli.Compact(ctx, put.Header.Revision); err != nil {
		t.Fatal(err)
	}
	if a.Table().Get("x") == nil {
		t.Fatal("a saw the delete while paused")
	}
	compactions := a.compactions.Load()
	close(resume)

	waitFor(t, "a to drop x", hasNot(a, "x"))
	waitFor(t, "a's delete event "+rec.String(), rec.contains("put:a", "put:x", "delete:x"))
	if a.compactions.Load() != compactions+1 {
		t.Fatalf("compactions = %d, want %d", a.compactions.Load(), compactions+1)
	}
	// The watch works again after the re-list.
	y := newNode(t, srv)
	if err := y.Register(ctx, member("y")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a to see y", has(a, "y"))
}

func TestEtcdLeaseLost(t *testing.T) {
	ctx := testCtx(t)
	srv := startEtcd(t)
	cli := newClient(t, srv)
	a := newNode(t, srv, WithLeaseTTL(2*time.Second))
	b := newNode(t, srv, WithLeaseTTL(2*time.Second))
	ma := member("a")
	if err := a.Register(ctx, ma); err != nil {
		t.Fatal(err)
	}
	if err := b.Register(ctx, member("b")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "b to see a", has(b, "a"))
	rec, cancel := record(b)
	defer cancel()

	old := leaseOf(t, cli, "a")
	if _, err := cli.Revoke(ctx, old); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a to notice the lost lease", func() bool { return a.leaseLosses.Load() == 1 })
	waitFor(t, "a to be routable again", a.Routable)
	waitFor(t, "b to see a leave and come back "+rec.String(), rec.contains("put:a", "delete:a", "put:a"))
	waitFor(t, "b to see a", has(b, "a"))
	if l := leaseOf(t, cli, "a"); l == old {
		t.Fatal("a is still under the revoked lease")
	}
	if n := a.Self().Num; n != ma.Num {
		t.Fatalf("a re-claimed number %d, had %d", n, ma.Num)
	}
	waitFor(t, "a to see itself", has(a, "a"))
}

func TestEtcdOutage(t *testing.T) {
	ctx := testCtx(t)
	srv := startEtcd(t)
	const ttl = 2 * time.Second
	a := newNode(t, srv, WithLeaseTTL(ttl))
	b := newNode(t, srv, WithLeaseTTL(ttl))
	if err := a.Register(ctx, member("a", "chat")); err != nil {
		t.Fatal(err)
	}
	if err := b.Register(ctx, member("b", "chat")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a and b to see each other", func() bool { return a.Table().Len() == 2 && b.Table().Len() == 2 })

	if err := srv.Stop(); err != nil {
		t.Fatal(err)
	}
	// Without etcd the keep-alive gets no answer for a TTL: the lease is
	// considered lost and both nodes stop being routable.
	start := time.Now()
	waitFor(t, "the nodes to become non-routable", func() bool { return !a.Routable() && !b.Routable() })
	t.Logf("non-routable %v after the outage began", time.Since(start))
	if time.Since(start) < ttl/2 {
		t.Fatalf("lease lost after only %v", time.Since(start))
	}
	// The tables keep the last known members during the outage.
	for _, d := range []*Etcd{a, b} {
		if l := d.Table().ByService("chat"); len(l) != 2 {
			t.Fatalf("table during the outage: %v", d.Table().Members)
		}
	}

	if err := srv.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	waitFor(t, "the cluster to re-form", func() bool {
		return a.Routable() && b.Routable() && a.Table().Len() == 2 && b.Table().Len() == 2
	})
	t.Logf("re-formed %v after the restart", time.Since(start))
	// Both records are back in etcd under live leases.
	cli := newClient(t, srv)
	for _, id := range []string{"a", "b"} {
		lease := leaseOf(t, cli, id)
		ttl, err := cli.TimeToLive(ctx, lease)
		if err != nil || ttl.TTL <= 0 {
			t.Fatalf("lease of %s: %+v %v", id, ttl, err)
		}
	}
	// And the watch works again.
	c := newNode(t, srv)
	if err := c.Register(ctx, member("c")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a and b to see c", func() bool { return has(a, "c")() && has(b, "c")() })
}

func TestEtcdCloseWhileDown(t *testing.T) {
	srv := startEtcd(t)
	a := newNode(t, srv)
	if err := a.Register(testCtx(t), member("a")); err != nil {
		t.Fatal(err)
	}
	srv.Stop()
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	start := time.Now()
	err := a.Close(ctx)
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("Close took %v", d)
	}
	t.Logf("Close with etcd down: %v", err)
	if a.Routable() {
		t.Fatal("routable after Close")
	}
}

func TestEtcdNoGoroutineLeak(t *testing.T) {
	ctx := testCtx(t)
	srv := startEtcd(t)
	base := runtime.NumGoroutine()
	var nodes []*Etcd
	for _, id := range []string{"a", "b"} {
		d, err := NewEtcd(WithEndpoints(srv.Endpoints()...))
		if err != nil {
			t.Fatal(err)
		}
		if err := d.Register(ctx, member(id)); err != nil {
			t.Fatal(err)
		}
		d.Subscribe(func(Event) {})
		nodes = append(nodes, d)
	}
	waitFor(t, "a to see b", has(nodes[0], "b"))
	for _, d := range nodes {
		if err := d.Close(ctx); err != nil {
			t.Fatal(err)
		}
	}
	checkNoLeak(t, base)
}
