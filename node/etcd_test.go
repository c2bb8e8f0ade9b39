package node

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/nanomesh/nanomesh/client"
	"github.com/nanomesh/nanomesh/discovery"
	"github.com/nanomesh/nanomesh/discovery/embedded"
	"github.com/nanomesh/nanomesh/handler"
	"github.com/nanomesh/nanomesh/message"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// The cluster over a real (embedded) etcd, with 1 s leases.

const etcdTTL = time.Second

// etcdEnv is one embedded etcd and the nodes registered in it.
type etcdEnv struct {
	t    *testing.T
	srv  *embedded.Server
	disc map[string]*discovery.Etcd // by node id
}

func newEtcdEnv(t *testing.T) *etcdEnv {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	start := time.Now()
	srv, err := embedded.Start(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Close() })
	t.Logf("embedded etcd up in %v", time.Since(start).Round(time.Millisecond))
	return &etcdEnv{t: t, srv: srv, disc: map[string]*discovery.Etcd{}}
}

// discovery returns a new etcd Discovery for node id (its own client).
func (e *etcdEnv) discovery(id string) *discovery.Etcd {
	e.t.Helper()
	d, err := discovery.NewEtcd(
		discovery.WithEndpoints(e.srv.Endpoints()...),
		discovery.WithPrefix("/node-test"),
		discovery.WithLeaseTTL(etcdTTL),
		discovery.WithDialTimeout(time.Second),
	)
	if err != nil {
		e.t.Fatal(err)
	}
	// The node's Shutdown closes it; this covers nodes that failed to start.
	e.t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = d.Close(ctx)
	})
	e.disc[id] = d
	return d
}

// backend starts a node serving an Echo component as service.
func (e *etcdEnv) backend(id, service string, extra ...Option) (*Node, *Echo) {
	e.t.Helper()
	echo := newEcho(id)
	n := startNode(e.t, append([]Option{
		WithCluster(e.discovery(id), id, "127.0.0.1:0"),
		WithComponent(echo, handler.WithName(service), handler.WithNameFunc(handler.LowerFirst)),
	}, extra...)...)
	return n, echo
}

// gate starts a node with client listeners and no component of its own.
func (e *etcdEnv) gate(id string) *Node {
	e.t.Helper()
	return startNode(e.t, WithCluster(e.discovery(id), id, "127.0.0.1:0"), WithTCPAddr("127.0.0.1:0"))
}

// firstRouted measures the time from a backend's Start returning to the
// first request the gate routes to it: it polls c with a request to route
// until the backend answers. The backend must be the only member of its
// service. start is when Start returned.
func firstRouted(t *testing.T, c *client.Client, route, want string, start time.Time) time.Duration {
	t.Helper()
	deadline := start.Add(10 * time.Second)
	var last error
	for time.Now().Before(deadline) {
		var r EchoReply
		err := request(t, c, route, &EchoReq{Msg: "first"}, &r)
		if err == nil && r.Node == want {
			return time.Since(start)
		}
		last = err
		if err == nil {
			last = fmt.Errorf("served by %s", r.Node)
		}
		time.Sleep(time.Millisecond)
	}
	t.Fatalf("gate never routed %s to %s: %v", route, want, last)
	return 0
}

func TestEtcdClusterRequestNotifyPush(t *testing.T) {
	e := newEtcdEnv(t)
	b1, echo1 := e.backend("echo-1", "echo")
	b2, echo2 := e.backend("echo-2", "echo")
	g := e.gate("gate-1")

	// Registration is visible everywhere, with the published addresses.
	for _, id := range []string{"echo-1", "echo-2", "gate-1"} {
		for _, d := range e.disc {
			waitFor(t, id+" visible", func() bool { return d.Table().Get(id) != nil })
		}
	}
	if m := e.disc["gate-1"].Table().Get("echo-1"); m.GRPCAddr != b1.GRPCAddr() || !m.Serves("echo") || m.Num == 0 {
		t.Fatalf("echo-1 as the gate sees it: %+v (grpc %s)", m, b1.GRPCAddr())
	}
	if got := len(e.disc["echo-2"].Table().ByService("echo")); got != 2 {
		t.Fatalf("echo-2 sees %d echo members, want 2", got)
	}

	// Requests, notifies and pushes through the gate, for several sessions.
	served := map[string]int{}
	for i := range 6 {
		c := dial(t, g)
		pushes := c.Pushes("onShout", 4)
		var r EchoReply
		if err := request(t, c, "echo.echo", &EchoReq{Msg: fmt.Sprint(i)}, &r); err != nil || r.Msg != fmt.Sprint(i) {
			t.Fatalf("request: %v %+v", err, r)
		}
		served[r.Node]++
		if err := request(t, c, "echo.join", nil, nil); err != nil {
			t.Fatal(err)
		}
		if err := c.Notify(context.Background(), "echo.shout", &EchoReq{Msg: fmt.Sprint("shout ", i)}); err != nil {
			t.Fatal(err)
		}
		select {
		case b := <-pushes:
			if want := fmt.Sprintf(`{"msg":"shout %d"}`, i); string(b) != want {
				t.Fatalf("push %s, want %s", b, want)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("session %d: no push", i)
		}
	}
	t.Logf("sessions per backend: %v", served)
	if echo1.group.Count()+echo2.group.Count() != 6 {
		t.Fatalf("group sizes %d + %d, want 6", echo1.group.Count(), echo2.group.Count())
	}

	// A backend of a new service, registered now: how long until the gate
	// routes to it.
	c := dial(t, g)
	late, _ := e.backend("late-1", "late")
	started := time.Now()
	d := firstRouted(t, c, "late.echo", "late-1", started)
	t.Logf("late-1 Start returned -> first request routed to it by the gate: %v", d)
	_ = late
	_ = b2
}

func TestEtcdDuplicateID(t *testing.T) {
	e := newEtcdEnv(t)
	first, _ := e.backend("echo-1", "echo")
	g := e.gate("gate-1")

	dup := New(
		WithCluster(e.discovery("echo-1-dup"), "echo-1", "127.0.0.1:0"),
		WithComponent(newEcho("impostor"), handler.WithName("echo"), handler.WithNameFunc(handler.LowerFirst)),
	)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := dup.Start(ctx)
	if !errors.Is(err, discovery.ErrDuplicateID) {
		t.Fatalf("Start with a live node's id: %v, want ErrDuplicateID", err)
	}
	t.Logf("refused: %v", err)
	// The live node's record is untouched and still serves.
	if m := e.disc["gate-1"].Table().Get("echo-1"); m == nil || m.GRPCAddr != first.GRPCAddr() {
		t.Fatalf("echo-1 record after the duplicate: %+v", m)
	}
	var r EchoReply
	if err := request(t, dial(t, g), "echo.echo", &EchoReq{Msg: "x"}, &r); err != nil || r.Node != "echo-1" {
		t.Fatalf("request after the duplicate: %v %+v", err, r)
	}
}

// crash stops n as a crash would: its gRPC server drops every connection
// and its etcd client goes away without revoking the lease, which has to
// expire.
func (e *etcdEnv) crash(n *Node) {
	n.cluster.srv.Stop()
	if err := e.disc[n.ID()].Client().Close(); err != nil {
		e.t.Logf("closing %s's etcd client: %v", n.ID(), err)
	}
	// Its Shutdown can no longer revoke anything: bound it (the etcd client
	// retries the revoke on its closed connection for seconds).
	e.t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		defer cancel()
		_ = n.Shutdown(ctx)
	})
}

func TestEtcdBackendCrash(t *testing.T) {
	e := newEtcdEnv(t)
	backs := map[string]*Node{}
	for _, id := range []string{"echo-1", "echo-2"} {
		backs[id], _ = e.backend(id, "echo")
	}
	g := e.gate("gate-1")
	gt := e.disc["gate-1"]
	waitFor(t, "gate sees both backends", func() bool { return len(gt.Table().ByService("echo")) == 2 })

	c := dial(t, g)
	var r EchoReply
	if err := request(t, c, "echo.echo", &EchoReq{}, &r); err != nil {
		t.Fatal(err)
	}
	victim, survivor := r.Node, map[string]string{"echo-1": "echo-2", "echo-2": "echo-1"}[r.Node]

	crashed := time.Now()
	e.crash(backs[victim])

	// The gate sees the link fail at once and re-routes the pinned session.
	var failover time.Duration
	for deadline := time.Now().Add(10 * time.Second); ; {
		err := request(t, c, "echo.echo", &EchoReq{}, &r)
		if err == nil {
			if r.Node != survivor {
				t.Fatalf("request after the crash served by %s", r.Node)
			}
			failover = time.Since(crashed)
			break
		}
		var ce *client.Error
		if !errors.As(err, &ce) || ce.Code != message.CodeBadGateway || time.Now().After(deadline) {
			t.Fatalf("request after the crash: %v", err)
		}
		time.Sleep(time.Millisecond)
	}
	t.Logf("crash -> first request served by the survivor: %v", failover)

	// Its record goes when its lease expires, not before.
	waitFor(t, "crashed backend removed from the gate's table", func() bool { return gt.Table().Get(victim) == nil })
	removed := time.Since(crashed)
	t.Logf("crash -> removed from the gate's table: %v (lease TTL %v)", removed, etcdTTL)
	if removed < etcdTTL/3 {
		t.Fatalf("removed after %v: the lease (TTL %v) cannot have expired yet", removed, etcdTTL)
	}
	waitFor(t, "survivor's table", func() bool { return e.disc[survivor].Table().Get(victim) == nil })

	// New sessions and the old one all go to the survivor.
	for i := range 4 {
		cc := c
		if i > 0 {
			cc = dial(t, g)
		}
		if err := request(t, cc, "echo.echo", &EchoReq{}, &r); err != nil || r.Node != survivor {
			t.Fatalf("request %d after removal: %v, served by %q", i, err, r.Node)
		}
	}
}

func TestEtcdOutage(t *testing.T) {
	e := newEtcdEnv(t)
	_, echo1 := e.backend("echo-1", "echo")
	g := e.gate("gate-1")
	ids := []string{"echo-1", "gate-1"}

	c := dial(t, g)
	pushes := c.Pushes("onShout", 8)
	if err := request(t, c, "echo.join", nil, nil); err != nil {
		t.Fatal(err)
	}
	shout := func(msg string) {
		t.Helper()
		if err := c.Notify(context.Background(), "echo.shout", &EchoReq{Msg: msg}); err != nil {
			t.Fatal(err)
		}
		select {
		case b := <-pushes:
			if want := `{"msg":"` + msg + `"}`; string(b) != want {
				t.Fatalf("push %s, want %s", b, want)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("no push for %q (group has %d)", msg, echo1.group.Count())
		}
	}
	shout("before")

	stopped := time.Now()
	if err := e.srv.Stop(); err != nil {
		t.Fatal(err)
	}
	// Longer than the TTL: every node loses its lease...
	for _, id := range ids {
		d := e.disc[id]
		waitFor(t, id+" not routable", func() bool { return !d.Routable() })
	}
	t.Logf("etcd down -> all leases lost: %v", time.Since(stopped))
	// ...and keeps serving with the last known table: old and new sessions.
	for i := range 3 {
		var r EchoReply
		if err := request(t, c, "echo.echo", &EchoReq{Msg: "outage"}, &r); err != nil || r.Node != "echo-1" {
			t.Fatalf("request %d during the outage: %v %+v", i, err, r)
		}
	}
	var r EchoReply
	if err := request(t, dial(t, g), "echo.echo", &EchoReq{}, &r); err != nil || r.Node != "echo-1" {
		t.Fatalf("new session during the outage: %v %+v", err, r)
	}
	shout("during")
	// The scenario is an outage longer than the TTL: keep etcd down until
	// it is (the client may notice the lost lease a few ms early).
	for time.Since(stopped) <= etcdTTL {
		time.Sleep(10 * time.Millisecond)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := e.srv.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	restarted := time.Now()
	t.Logf("etcd down for %v, restarted on the same data dir", restarted.Sub(stopped))

	// The cluster re-forms: everybody registered again and in each other's table.
	for _, id := range ids {
		d := e.disc[id]
		waitFor(t, id+" routable again", d.Routable)
		for _, other := range ids {
			waitFor(t, id+" sees "+other, func() bool { return d.Table().Get(other) != nil })
		}
	}
	t.Logf("etcd restarted -> cluster re-formed: %v", time.Since(restarted))

	// A backend registered after the restart is routable from the gate.
	late, _ := e.backend("late-1", "late")
	started := time.Now()
	t.Logf("after restart: late-1 Start returned -> first request routed to it by the gate: %v",
		firstRouted(t, c, "late.echo", "late-1", started))
	_ = late

	// The session lived through it all, on the same backend, with its state.
	if err := request(t, c, "echo.echo", &EchoReq{}, &r); err != nil || r.Node != "echo-1" {
		t.Fatalf("request after the restart: %v %+v", err, r)
	}
	shout("after")
}

// TestEtcdRecordRecreated deletes a live backend's record behind its back
// (its lease revoked by someone else, as happens when a node re-registers
// after an etcd outage): the gate stops routing to it, the node registers
// again, and the gate's link to it survives, so the backend keeps the
// sessions of the gate and their state.
func TestEtcdRecordRecreated(t *testing.T) {
	e := newEtcdEnv(t)
	_, echo1 := e.backend("echo-1", "echo")
	g := e.gate("gate-1")
	c := dial(t, g)
	pushes := c.Pushes("onShout", 8)
	if err := request(t, c, "echo.join", nil, nil); err != nil {
		t.Fatal(err)
	}

	cli := e.disc["gate-1"].Client()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := cli.Get(ctx, "/node-test/members/echo-1")
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("get echo-1's record: %v %v", resp, err)
	}
	var mu sync.Mutex
	var events []string
	done := make(chan struct{})
	cancelSub := e.disc["gate-1"].Subscribe(func(ev discovery.Event) {
		if ev.Member.ID != "echo-1" {
			return
		}
		mu.Lock()
		defer mu.Unlock()
		events = append(events, ev.Type.String())
		if len(events) == 3 { // the initial put, the delete, the put again
			close(done)
		}
	})
	defer cancelSub()
	revoked := time.Now()
	if _, err := cli.Revoke(ctx, clientv3.LeaseID(resp.Kvs[0].Lease)); err != nil {
		t.Fatal(err)
	}
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		mu.Lock()
		defer mu.Unlock()
		t.Fatalf("gate saw %v for echo-1", events)
	}
	t.Logf("record revoked -> re-created and seen by the gate: %v", time.Since(revoked))

	if err := c.Notify(context.Background(), "echo.shout", &EchoReq{Msg: "still here"}); err != nil {
		t.Fatal(err)
	}
	select {
	case b := <-pushes:
		if string(b) != `{"msg":"still here"}` {
			t.Fatalf("push %s", b)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("no push: the backend lost the session (group has %d)", echo1.group.Count())
	}
}

// TestEtcdGracefulShutdown: a backend that shuts down revokes its lease, so
// the gate drops it within one watch event; the gate closes its link on the
// backend's drain notice (not after reviveWindow), so Shutdown is quick; the
// sessions it served move to the other backend.
func TestEtcdGracefulShutdown(t *testing.T) {
	e := newEtcdEnv(t)
	backs := map[string]*Node{}
	for _, id := range []string{"echo-1", "echo-2"} {
		backs[id], _ = e.backend(id, "echo")
	}
	g := e.gate("gate-1")
	gt := e.disc["gate-1"]
	waitFor(t, "gate sees both backends", func() bool { return len(gt.Table().ByService("echo")) == 2 })
	c := dial(t, g)
	var r EchoReply
	if err := request(t, c, "echo.echo", &EchoReq{}, &r); err != nil {
		t.Fatal(err)
	}
	leaving, survivor := r.Node, map[string]string{"echo-1": "echo-2", "echo-2": "echo-1"}[r.Node]

	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := backs[leaving].Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	waitFor(t, "gate dropped the departed backend", func() bool { return gt.Table().Get(leaving) == nil })
	t.Logf("graceful Shutdown of %s: %v; gone from the gate's table %v after it began", leaving, took, time.Since(start))
	if took >= reviveWindow {
		t.Fatalf("Shutdown took %v: the gate held the link for the revive window", took)
	}
	if err := request(t, c, "echo.echo", &EchoReq{}, &r); err != nil || r.Node != survivor {
		t.Fatalf("request after the shutdown: %v, served by %q", err, r.Node)
	}
}
