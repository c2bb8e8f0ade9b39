package node

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nanomesh/nanomesh/client"
	"github.com/nanomesh/nanomesh/discovery"
	"github.com/nanomesh/nanomesh/handler"
	"github.com/nanomesh/nanomesh/message"
	"github.com/nanomesh/nanomesh/session"
)

// Echo is a backend component that reports which node served a request.
type Echo struct {
	handler.Base
	node  string
	group *session.Group
	calls atomic.Int64
	block chan struct{} // if set, Slow waits on it
}

type EchoReply struct {
	Node string `json:"node"`
	Msg  string `json:"msg"`
	UID  int64  `json:"uid"`
	SID  int64  `json:"sid"`
	Data string `json:"data"`
}

type EchoReq struct {
	Msg string `json:"msg"`
}

func (e *Echo) Echo(s *session.Session, r *EchoReq) error {
	e.calls.Add(1)
	return s.Response(&EchoReply{Node: e.node, Msg: r.Msg, UID: s.UID(), SID: s.ID(), Data: s.String("color")})
}

func (e *Echo) Slow(s *session.Session, r *EchoReq) error {
	if e.block != nil {
		<-e.block
	}
	return s.Response(&EchoReply{Node: e.node, Msg: r.Msg})
}

func (e *Echo) Bind(s *session.Session, r *EchoReq) error {
	if err := s.Bind(42); err != nil {
		return err
	}
	return s.Response(&EchoReply{Node: e.node, UID: s.UID()})
}

func (e *Echo) Join(s *session.Session, _ []byte) error {
	if err := e.group.Add(s); err != nil {
		return err
	}
	return s.Response(&EchoReply{Node: e.node})
}

func (e *Echo) Shout(s *session.Session, r *EchoReq) error {
	return e.group.Broadcast("onShout", r)
}

func (e *Echo) KickMe(s *session.Session, _ []byte) error { return s.Kick("backend says bye") }

func (e *Echo) Fail(s *session.Session, _ []byte) error {
	return message.NewError(418, "teapot on %s", e.node)
}

func newEcho(id string) *Echo { return &Echo{node: id, group: session.NewGroup("echo", nil)} }

// Profile is a gate-local component, to set session data before forwarding.
type Profile struct{ handler.Base }

func (Profile) Color(s *session.Session, r *EchoReq) error {
	s.Set("color", r.Msg)
	return s.Response(&EchoReply{Msg: r.Msg})
}

type testCluster struct {
	t     *testing.T
	disc  func() discovery.Discovery
	gates []*Node
	backs []*Node
	echos []*Echo
}

func startNode(t *testing.T, opts ...Option) *Node {
	t.Helper()
	n := New(opts...)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := n.Start(ctx); err != nil {
		t.Fatalf("start: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = n.Shutdown(ctx)
	})
	return n
}

func newMemCluster(t *testing.T, gates, backends int, extra ...Option) *testCluster {
	mc := discovery.NewMemoryCluster()
	tc := &testCluster{t: t, disc: func() discovery.Discovery { return mc.Join() }}
	for i := range backends {
		id := fmt.Sprintf("echo-%d", i+1)
		e := newEcho(id)
		tc.echos = append(tc.echos, e)
		tc.backs = append(tc.backs, startNode(t, append([]Option{
			WithCluster(tc.disc(), id, "127.0.0.1:0"),
			WithComponent(e, handler.WithName("echo"), handler.WithNameFunc(handler.LowerFirst)),
		}, extra...)...))
	}
	for i := range gates {
		tc.gates = append(tc.gates, startNode(t, append([]Option{
			WithCluster(tc.disc(), fmt.Sprintf("gate-%d", i+1), "127.0.0.1:0"),
			WithTCPAddr("127.0.0.1:0"),
			WithWSAddr("127.0.0.1:0"),
			WithComponent(Profile{}, handler.WithName("profile"), handler.WithNameFunc(handler.LowerFirst)),
		}, extra...)...))
	}
	return tc
}

func dial(t *testing.T, n *Node) *client.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := client.Dial(ctx, "tcp://"+n.TCPAddr())
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func request(t *testing.T, c *client.Client, route string, req, resp any) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return c.Request(ctx, route, req, resp)
}

func TestClusterForwardSticky(t *testing.T) {
	tc := newMemCluster(t, 1, 2)
	c := dial(t, tc.gates[0])
	var first EchoReply
	if err := request(t, c, "echo.echo", &EchoReq{Msg: "hi"}, &first); err != nil {
		t.Fatal(err)
	}
	if first.Msg != "hi" || first.Node == "" {
		t.Fatalf("reply %+v", first)
	}
	for i := range 20 {
		var r EchoReply
		if err := request(t, c, "echo.echo", &EchoReq{Msg: fmt.Sprint(i)}, &r); err != nil {
			t.Fatal(err)
		}
		if r.Node != first.Node {
			t.Fatalf("request %d served by %s, pinned to %s", i, r.Node, first.Node)
		}
	}
}

func TestClusterSessionStateAndErrors(t *testing.T) {
	tc := newMemCluster(t, 1, 1)
	c := dial(t, tc.gates[0])
	var r EchoReply
	if err := request(t, c, "profile.color", &EchoReq{Msg: "blue"}, &r); err != nil {
		t.Fatal(err)
	}
	if err := request(t, c, "echo.bind", &EchoReq{}, &r); err != nil || r.UID != 42 {
		t.Fatalf("bind: %v %+v", err, r)
	}
	if err := request(t, c, "echo.echo", &EchoReq{Msg: "x"}, &r); err != nil {
		t.Fatal(err)
	}
	if r.UID != 42 || r.Data != "blue" || r.SID == 0 {
		t.Fatalf("backend saw uid=%d data=%q sid=%d, want 42, blue, non-zero", r.UID, r.Data, r.SID)
	}
	// The gate's own session learned the uid the backend bound.
	s, ok := tc.gates[0].Agent().Session(r.SID)
	if !ok || s.UID() != 42 {
		t.Fatalf("gate session uid: ok=%v", ok)
	}
	var ce *client.Error
	if err := request(t, c, "echo.fail", nil, nil); !errors.As(err, &ce) || ce.Code != 418 {
		t.Fatalf("coded error across nodes: %v", err)
	}
	if err := request(t, c, "nosuch.route", nil, nil); !errors.As(err, &ce) || ce.Code != 404 {
		t.Fatalf("unknown service: %v", err)
	}
	if err := request(t, c, "echo.nosuch", nil, nil); !errors.As(err, &ce) || ce.Code != 404 {
		t.Fatalf("unknown route of remote service: %v", err)
	}
}

func TestClusterKickAndCloseNotice(t *testing.T) {
	tc := newMemCluster(t, 1, 1)
	c := dial(t, tc.gates[0])
	var r EchoReply
	if err := request(t, c, "echo.join", nil, &r); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "backend group has the member", func() bool { return tc.echos[0].group.Count() == 1 })
	_ = c.Close()
	waitFor(t, "backend released the closed session", func() bool { return tc.echos[0].group.Count() == 0 })

	c2 := dial(t, tc.gates[0])
	_ = request(t, c2, "echo.kickMe", nil, nil)
	select {
	case <-c2.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("client not kicked")
	}
	if reason, ok := c2.Kicked(); !ok || reason != "backend says bye" {
		t.Fatalf("kick reason %q %v", reason, ok)
	}
	waitFor(t, "gate session table empty", func() bool { return tc.gates[0].Agent().Sessions() == 0 })
}

func TestClusterCrossGateBroadcast(t *testing.T) {
	tc := newMemCluster(t, 2, 1)
	var clients []*client.Client
	var pushes []<-chan []byte
	for i := range 4 {
		c := dial(t, tc.gates[i%2])
		pushes = append(pushes, c.Pushes("onShout", 4))
		if err := request(t, c, "echo.join", nil, nil); err != nil {
			t.Fatal(err)
		}
		clients = append(clients, c)
	}
	if err := clients[0].Notify(context.Background(), "echo.shout", &EchoReq{Msg: "all"}); err != nil {
		t.Fatal(err)
	}
	for i, ch := range pushes {
		select {
		case b := <-ch:
			if string(b) != `{"msg":"all"}` {
				t.Fatalf("client %d got %s", i, b)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("client %d got no broadcast", i)
		}
	}
}

func TestClusterBackendKilledMidRequest(t *testing.T) {
	tc := newMemCluster(t, 1, 2)
	for _, e := range tc.echos {
		e.block = make(chan struct{})
		t.Cleanup(func() { close(e.block) })
	}
	c := dial(t, tc.gates[0])
	var r EchoReply
	if err := request(t, c, "echo.echo", &EchoReq{}, &r); err != nil {
		t.Fatal(err)
	}
	victim := map[string]int{"echo-1": 0, "echo-2": 1}[r.Node]
	errc := make(chan error, 1)
	go func() { errc <- request(t, c, "echo.slow", &EchoReq{}, nil) }()
	waitFor(t, "request in flight", func() bool { return tc.gates[0].cluster.inflight() == 1 })
	start := time.Now()
	tc.backs[victim].kill()
	var ce *client.Error
	select {
	case err := <-errc:
		if !errors.As(err, &ce) || ce.Code != message.CodeBadGateway {
			t.Fatalf("want 502, got %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("in-flight request to a killed node never answered")
	}
	t.Logf("502 after %v", time.Since(start))
	if err := request(t, c, "echo.echo", &EchoReq{}, &r); err != nil {
		t.Fatalf("next request: %v", err)
	}
	if r.Node == tc.echos[victim].node {
		t.Fatalf("next request served by the dead node %s", r.Node)
	}
}

func TestClusterGracefulShutdownUnderLoad(t *testing.T) {
	tc := newMemCluster(t, 1, 2)
	const clients, perClient = 8, 60
	errc := make(chan error, clients)
	var done atomic.Int64
	for i := range clients {
		c := dial(t, tc.gates[0])
		go func() {
			for j := range perClient {
				var r EchoReply
				if err := request(t, c, "echo.echo", &EchoReq{Msg: fmt.Sprint(j)}, &r); err != nil {
					errc <- fmt.Errorf("client %d request %d: %w", i, j, err)
					return
				}
				done.Add(1)
			}
			errc <- nil
		}()
	}
	waitFor(t, "load running", func() bool { return done.Load() > clients*perClient/4 })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := tc.backs[0].Shutdown(ctx); err != nil {
		t.Fatalf("shutdown: %v", err)
	}
	for range clients {
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
	}
	if got := done.Load(); got != clients*perClient {
		t.Fatalf("%d of %d requests completed", got, clients*perClient)
	}
}

func TestClusterServerToServerRPC(t *testing.T) {
	tc := newMemCluster(t, 1, 1)
	var r EchoReply
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := tc.gates[0].RPC(ctx, "echo.echo", &EchoReq{Msg: "s2s"}, &r); err != nil {
		t.Fatal(err)
	}
	if r.Msg != "s2s" || r.Node != "echo-1" {
		t.Fatalf("rpc reply %+v", r)
	}
	var me *message.Error
	if err := tc.gates[0].RPC(ctx, "echo.fail", nil, nil); !errors.As(err, &me) || me.Code != 418 {
		t.Fatalf("rpc error: %v", err)
	}
	if err := tc.gates[0].RPC(ctx, "none.x", nil, nil); !errors.Is(err, ErrNoRoute) {
		t.Fatalf("rpc to nobody: %v", err)
	}
	before := tc.echos[0].calls.Load()
	if err := tc.gates[0].Notify(ctx, "echo.echo", &EchoReq{Msg: "n"}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "notify ran", func() bool { return tc.echos[0].calls.Load() == before+1 })
	// Local RPC runs the handler in-process.
	if err := tc.backs[0].RPC(ctx, "echo.echo", &EchoReq{Msg: "local"}, &r); err != nil || r.Msg != "local" {
		t.Fatalf("local rpc: %v %+v", err, r)
	}
}

// waitFor polls cond until it holds or 10 s pass.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for: %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
