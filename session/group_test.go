package session_test

import (
	"errors"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/nanomesh/nanomesh/message"
	"github.com/nanomesh/nanomesh/session"
)

// countingSer is JSON that counts Marshal calls.
type countingSer struct{ n atomic.Int64 }

func (c *countingSer) Name() string { return "json" }
func (c *countingSer) Marshal(v any) ([]byte, error) {
	c.n.Add(1)
	return message.JSON.Marshal(v)
}
func (c *countingSer) Unmarshal(data []byte, v any) error { return message.JSON.Unmarshal(data, v) }

// gateEntity is a BatchPusher: a session held by gate key.
type gateEntity struct {
	recEntity
	key string
	gw  *gateway
}

// gateway records the batches sent through it.
type gateway struct {
	mu      sync.Mutex
	batches []call
}

func (e *gateEntity) BatchKey() string { return e.key }
func (e *gateEntity) PushBatch(ids []int64, route string, data []byte) error {
	e.gw.mu.Lock()
	defer e.gw.mu.Unlock()
	e.gw.batches = append(e.gw.batches, call{kind: "batch:" + e.key, route: route, data: string(data), ids: slices.Clone(ids)})
	return nil
}

func members(t *testing.T, n int) ([]*session.Session, []*recEntity) {
	t.Helper()
	ss := make([]*session.Session, n)
	es := make([]*recEntity, n)
	for i := range ss {
		es[i] = &recEntity{}
		ss[i] = session.New(int64(i+1), es[i], nil)
	}
	return ss, es
}

func sortedMembers(g *session.Group) []int64 {
	ids := g.Members()
	slices.Sort(ids)
	return ids
}

func TestGroupMembership(t *testing.T) {
	g := session.NewGroup("room", nil)
	if g.Name() != "room" || g.Count() != 0 || len(g.Members()) != 0 {
		t.Fatal("new group")
	}
	ss, _ := members(t, 3)
	for _, s := range ss {
		if err := g.Add(s); err != nil {
			t.Fatal(err)
		}
	}
	if err := g.Add(ss[1]); !errors.Is(err, session.ErrMemberExists) {
		t.Fatalf("duplicate Add: %v", err)
	}
	if g.Count() != 3 || !slices.Equal(sortedMembers(g), []int64{1, 2, 3}) {
		t.Fatalf("members %v", g.Members())
	}
	if !g.Contains(2) || g.Contains(4) {
		t.Fatal("Contains")
	}
	if m, ok := g.Member(2); !ok || m != ss[1] {
		t.Fatal("Member")
	}
	if err := g.Leave(ss[1]); err != nil {
		t.Fatal(err)
	}
	if err := g.Leave(ss[1]); !errors.Is(err, session.ErrMemberNotFound) {
		t.Fatalf("second Leave: %v", err)
	}
	if g.Contains(2) || g.Count() != 2 || !slices.Equal(sortedMembers(g), []int64{1, 3}) {
		t.Fatalf("after Leave: %v", g.Members())
	}
	if err := g.Add(ss[1]); err != nil {
		t.Fatalf("Add after Leave: %v", err)
	}
	g.LeaveAll()
	if g.Count() != 0 {
		t.Fatal("LeaveAll")
	}
	if err := g.Add(ss[0]); err != nil {
		t.Fatalf("Add after LeaveAll: %v", err)
	}
}

func TestGroupRemovesReleasedSessions(t *testing.T) {
	g := session.NewGroup("room", nil)
	other := session.NewGroup("other", nil)
	ss, es := members(t, 3)
	for _, s := range ss {
		if err := g.Add(s); err != nil {
			t.Fatal(err)
		}
	}
	if err := other.Add(ss[1]); err != nil {
		t.Fatal(err)
	}
	ss[1].Release()
	if g.Contains(2) || other.Contains(2) || g.Count() != 2 {
		t.Fatalf("released session still a member: %v / %v", g.Members(), other.Members())
	}
	if err := g.Broadcast("r", "x"); err != nil {
		t.Fatal(err)
	}
	if len(es[1].got()) != 0 {
		t.Fatal("released session pushed to")
	}
	// A session that left and came back is removed once, and a session
	// that left is not affected by its old membership.
	if err := g.Leave(ss[0]); err != nil {
		t.Fatal(err)
	}
	if err := g.Add(ss[0]); err != nil {
		t.Fatal(err)
	}
	ss[0].Release()
	if g.Contains(1) {
		t.Fatal("re-added session not removed on Release")
	}
	// A new session under the id of a released one is not removed by the
	// old one's close hook.
	again := session.New(3, &recEntity{}, nil)
	if err := g.Leave(ss[2]); err != nil {
		t.Fatal(err)
	}
	if err := g.Add(again); err != nil {
		t.Fatal(err)
	}
	ss[2].Release()
	if m, ok := g.Member(3); !ok || m != again {
		t.Fatal("session 3's successor removed by the old session's release")
	}
	// Adding an already released session does not leave it in the group.
	dead := session.New(9, &recEntity{}, nil)
	dead.Release()
	_ = g.Add(dead)
	if g.Contains(9) {
		t.Fatal("released session added")
	}
}

func TestBroadcastSerializesOnce(t *testing.T) {
	ser := &countingSer{}
	g := session.NewGroup("room", ser)
	ss, es := members(t, 50)
	for _, s := range ss {
		if err := g.Add(s); err != nil {
			t.Fatal(err)
		}
	}
	type chat struct {
		Name    string `json:"name"`
		Content string `json:"content"`
	}
	if err := g.Broadcast("onMessage", &chat{"ann", "hi"}); err != nil {
		t.Fatal(err)
	}
	if n := ser.n.Load(); n != 1 {
		t.Fatalf("Marshal called %d times for one broadcast to 50", n)
	}
	for i, e := range es {
		got := e.got()
		if len(got) != 1 || got[0].kind != "push" || got[0].route != "onMessage" ||
			got[0].data != `{"name":"ann","content":"hi"}` {
			t.Fatalf("member %d got %+v", i+1, got)
		}
	}
	// Unserializable: error, nobody pushed.
	if err := g.Broadcast("bad", func() {}); err == nil {
		t.Fatal("broadcast of an unserializable value")
	}
	for _, e := range es {
		if len(e.got()) != 1 {
			t.Fatal("push after a failed Marshal")
		}
	}
}

func TestBroadcastPushErrors(t *testing.T) {
	g := session.NewGroup("room", nil)
	ss, es := members(t, 4)
	for _, s := range ss {
		_ = g.Add(s)
	}
	es[1].err = errors.New("slow consumer")
	err := g.Broadcast("r", 1)
	if !errors.Is(err, es[1].err) {
		t.Fatalf("Broadcast: %v", err)
	}
	for i, e := range es { // every member is still tried
		if len(e.got()) != 1 {
			t.Fatalf("member %d: %d pushes", i+1, len(e.got()))
		}
	}
}

func TestMulticast(t *testing.T) {
	ser := &countingSer{}
	g := session.NewGroup("room", ser)
	ss, es := members(t, 6)
	for _, s := range ss {
		_ = g.Add(s)
	}
	if err := g.Multicast("odd", "x", func(s *session.Session) bool { return s.ID()%2 == 1 }); err != nil {
		t.Fatal(err)
	}
	for i, e := range es {
		want := 0
		if (i+1)%2 == 1 {
			want = 1
		}
		if len(e.got()) != want {
			t.Fatalf("member %d: %d pushes, want %d", i+1, len(e.got()), want)
		}
	}
	if err := g.Multicast("none", "x", func(*session.Session) bool { return false }); err != nil {
		t.Fatal(err)
	}
	if err := g.Multicast("all", "x", nil); err != nil {
		t.Fatal(err)
	}
	if ser.n.Load() != 3 {
		t.Fatalf("Marshal calls %d", ser.n.Load())
	}
	if len(es[1].got()) != 1 || len(es[0].got()) != 2 {
		t.Fatal("nil filter is everyone")
	}
}

func TestClosedGroup(t *testing.T) {
	g := session.NewGroup("room", nil)
	ss, es := members(t, 2)
	_ = g.Add(ss[0])
	g.Close()
	if g.Count() != 0 || g.Contains(1) {
		t.Fatal("Close keeps members")
	}
	if err := g.Add(ss[1]); !errors.Is(err, session.ErrGroupClosed) {
		t.Fatalf("Add to a closed group: %v", err)
	}
	if err := g.Broadcast("r", 1); !errors.Is(err, session.ErrGroupClosed) {
		t.Fatalf("Broadcast to a closed group: %v", err)
	}
	if err := g.Multicast("r", 1, nil); !errors.Is(err, session.ErrGroupClosed) {
		t.Fatalf("Multicast to a closed group: %v", err)
	}
	if len(es[0].got()) != 0 {
		t.Fatal("pushed after Close")
	}
	ss[0].Release() // the old close hook is harmless
}

func TestBroadcastBatches(t *testing.T) {
	ser := &countingSer{}
	g := session.NewGroup("room", ser)
	gw := &gateway{}
	var plain []*recEntity
	var gated []*gateEntity
	for i := int64(1); i <= 9; i++ {
		var e session.Entity
		switch i % 3 {
		case 0:
			r := &recEntity{}
			plain = append(plain, r)
			e = r
		case 1:
			ge := &gateEntity{key: "gate-a", gw: gw}
			gated = append(gated, ge)
			e = ge
		case 2:
			ge := &gateEntity{key: "gate-b", gw: gw}
			gated = append(gated, ge)
			e = ge
		}
		if err := g.Add(session.New(i, e, nil)); err != nil {
			t.Fatal(err)
		}
	}
	if err := g.Broadcast("onNews", map[string]int{"n": 1}); err != nil {
		t.Fatal(err)
	}
	if ser.n.Load() != 1 {
		t.Fatalf("Marshal calls %d", ser.n.Load())
	}
	gw.mu.Lock()
	batches := slices.Clone(gw.batches)
	gw.mu.Unlock()
	if len(batches) != 2 {
		t.Fatalf("%d PushBatch calls, want one per gate: %+v", len(batches), batches)
	}
	byKey := map[string][]int64{}
	for _, b := range batches {
		if b.route != "onNews" || b.data != `{"n":1}` {
			t.Fatalf("batch %+v", b)
		}
		ids := slices.Clone(b.ids)
		slices.Sort(ids)
		byKey[b.kind] = ids
	}
	if !slices.Equal(byKey["batch:gate-a"], []int64{1, 4, 7}) || !slices.Equal(byKey["batch:gate-b"], []int64{2, 5, 8}) {
		t.Fatalf("batches %v", byKey)
	}
	for _, ge := range gated {
		if len(ge.got()) != 0 {
			t.Fatal("batched member pushed to one by one")
		}
	}
	for _, e := range plain {
		if got := e.got(); len(got) != 1 || got[0].data != `{"n":1}` {
			t.Fatalf("plain member got %+v", got)
		}
	}
	// Multicast batches only the selected members.
	gw.mu.Lock()
	gw.batches = nil
	gw.mu.Unlock()
	if err := g.Multicast("onOdd", 1, func(s *session.Session) bool { return s.ID() == 4 }); err != nil {
		t.Fatal(err)
	}
	gw.mu.Lock()
	defer gw.mu.Unlock()
	if len(gw.batches) != 1 || !slices.Equal(gw.batches[0].ids, []int64{4}) {
		t.Fatalf("multicast batches %+v", gw.batches)
	}
}

// TestBroadcastConcurrent runs broadcasts against Add, Leave and Release
// (run it with -race).
func TestBroadcastConcurrent(t *testing.T) {
	g := session.NewGroup("room", nil)
	const n = 64
	ss, _ := members(t, n)
	for _, s := range ss[:n/2] {
		_ = g.Add(s)
	}
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for range 3 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				if err := g.Broadcast("tick", []byte("x")); err != nil {
					t.Error(err)
					return
				}
				_ = g.Multicast("even", []byte("y"), func(s *session.Session) bool { return s.ID()%2 == 0 })
				_ = g.Members()
				_ = g.Count()
			}
		})
	}
	var churn sync.WaitGroup
	for w := range 4 {
		churn.Go(func() {
			for i := range 300 {
				s := ss[(w*16+i)%n]
				if g.Contains(s.ID()) {
					_ = g.Leave(s)
				} else {
					_ = g.Add(s)
				}
			}
		})
	}
	churn.Go(func() {
		for i := range 200 {
			s := session.New(int64(1000+i), &recEntity{}, nil)
			_ = g.Add(s)
			s.Release()
		}
	})
	churn.Wait()
	close(stop)
	wg.Wait()
	for _, id := range g.Members() {
		if id >= 1000 {
			t.Fatalf("released session %d still a member", id)
		}
	}
}

type nopEntity struct{}

func (nopEntity) Push(string, []byte) error           { return nil }
func (nopEntity) Response(uint64, []byte, bool) error { return nil }
func (nopEntity) Kick(string) error                   { return nil }
func (nopEntity) Close() error                        { return nil }
func (nopEntity) RemoteAddr() net.Addr                { return nil }

// BenchmarkBroadcast: one broadcast to 1000 local members through a no-op
// entity.
func BenchmarkBroadcast(b *testing.B) {
	g := session.NewGroup("room", nil)
	for i := range 1000 {
		if err := g.Add(session.New(int64(i+1), nopEntity{}, nil)); err != nil {
			b.Fatal(err)
		}
	}
	type chat struct {
		Name    string `json:"name"`
		Content string `json:"content"`
	}
	msg := &chat{Name: "ann", Content: "hello, room"}
	b.ReportAllocs()
	for b.Loop() {
		if err := g.Broadcast("onMessage", msg); err != nil {
			b.Fatal(err)
		}
	}
}

// TestNoClosedMemberAfterRace: whatever the interleaving of Add, Leave and
// Release, a released session never stays in a group.
func TestNoClosedMemberAfterRace(t *testing.T) {
	groups := []*session.Group{session.NewGroup("a", nil), session.NewGroup("b", nil)}
	for i := range 500 {
		s := session.New(int64(i+1), nopEntity{}, nil)
		var wg sync.WaitGroup
		for _, g := range groups {
			wg.Go(func() {
				for range 4 {
					_ = g.Add(s)
					_ = g.Leave(s)
					_ = g.Add(s)
				}
			})
		}
		wg.Go(s.Release)
		wg.Wait()
		for _, g := range groups {
			if g.Contains(s.ID()) {
				t.Fatalf("iteration %d: released session still in group %s", i, g.Name())
			}
		}
	}
}
