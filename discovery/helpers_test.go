package discovery

import (
	"context"
	"fmt"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nanomesh/nanomesh/discovery/embedded"
)

const waitTimeout = 15 * time.Second

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func startEtcd(t *testing.T) *embedded.Server {
	t.Helper()
	srv, err := embedded.Start(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	return srv
}

func newNode(t *testing.T, srv *embedded.Server, opts ...EtcdOption) *Etcd {
	t.Helper()
	opts = append([]EtcdOption{WithEndpoints(srv.Endpoints()...), WithDialTimeout(2 * time.Second)}, opts...)
	d, err := NewEtcd(opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		d.Close(ctx)
	})
	return d
}

func member(id string, services ...string) *Member {
	m := &Member{ID: id, GRPCAddr: "127.0.0.1:1", ClientAddrs: map[string]string{"ws": "127.0.0.1:2"}}
	for _, s := range services {
		m.Services = append(m.Services, Service{Name: s, Routes: []string{s + ".hello"}})
	}
	return m
}

func has(d Discovery, id string) func() bool {
	return func() bool { return d.Table().Get(id) != nil }
}

func hasNot(d Discovery, id string) func() bool {
	return func() bool { return d.Table().Get(id) == nil }
}

// recorder records the events of one subscription as "put:id" / "delete:id".
type recorder struct {
	mu  sync.Mutex
	evs []string
}

func record(d Discovery) (*recorder, func()) {
	r := &recorder{}
	cancel := d.Subscribe(func(ev Event) {
		r.mu.Lock()
		r.evs = append(r.evs, ev.Type.String()+":"+ev.Member.ID)
		r.mu.Unlock()
	})
	return r, cancel
}

func (r *recorder) events() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.evs)
}

// contains reports whether want occurs in order (not necessarily adjacent)
// in the recorded events.
func (r *recorder) contains(want ...string) func() bool {
	return func() bool {
		i := 0
		for _, ev := range r.events() {
			if i < len(want) && ev == want[i] {
				i++
			}
		}
		return i == len(want)
	}
}

func (r *recorder) String() string { return fmt.Sprint(r.events()) }

// checkNoLeak waits until the number of goroutines is back to base.
func checkNoLeak(t *testing.T, base int) {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for runtime.NumGoroutine() > base {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			buf = buf[:runtime.Stack(buf, true)]
			var ours []string
			for _, g := range strings.Split(string(buf), "\n\n") {
				if strings.Contains(g, "nanomesh/discovery.") || strings.Contains(g, "etcd/client/v3") {
					ours = append(ours, g)
				}
			}
			t.Fatalf("goroutines: %d > %d at start; suspects:\n%s", runtime.NumGoroutine(), base, strings.Join(ours, "\n\n"))
		}
		time.Sleep(20 * time.Millisecond)
	}
}
