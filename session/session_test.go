package session_test

import (
	"encoding/json"
	"errors"
	"math"
	"net"
	"sync"
	"testing"

	"github.com/nanomesh/nanomesh/message"
	"github.com/nanomesh/nanomesh/session"
)

// call is one call an entity received.
type call struct {
	kind  string // push, response, kick, close, batch
	route string
	mid   uint64
	data  string
	isErr bool
	ids   []int64
}

// recEntity is an in-memory session.Entity recording every call.
type recEntity struct {
	mu    sync.Mutex
	calls []call
	err   error // returned by Push and Response when set
}

func (e *recEntity) add(c call) {
	e.mu.Lock()
	e.calls = append(e.calls, c)
	e.mu.Unlock()
}

func (e *recEntity) Push(route string, data []byte) error {
	e.add(call{kind: "push", route: route, data: string(data)})
	return e.err
}

func (e *recEntity) Response(mid uint64, data []byte, isError bool) error {
	e.add(call{kind: "response", mid: mid, data: string(data), isErr: isError})
	return e.err
}

func (e *recEntity) Kick(reason string) error { e.add(call{kind: "kick", data: reason}); return nil }
func (e *recEntity) Close() error             { e.add(call{kind: "close"}); return nil }
func (e *recEntity) RemoteAddr() net.Addr {
	return &net.TCPAddr{IP: net.IPv4(10, 0, 0, 1), Port: 4242}
}

func (e *recEntity) got() []call {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]call(nil), e.calls...)
}

// binderEntity also hears of Bind.
type binderEntity struct {
	recEntity
	bound [][2]int64
}

func (e *binderEntity) Bind(sid, uid int64) error {
	e.bound = append(e.bound, [2]int64{sid, uid})
	return nil
}

func TestSessionBasics(t *testing.T) {
	e := &recEntity{}
	s := session.New(7, e, nil)
	if s.ID() != 7 || s.UID() != 0 || s.Entity() != e {
		t.Fatalf("new session: id %d uid %d", s.ID(), s.UID())
	}
	if s.Serializer() != message.JSON {
		t.Fatalf("default serializer %v", s.Serializer().Name())
	}
	if s.RemoteAddr().String() != "10.0.0.1:4242" {
		t.Fatalf("RemoteAddr %v", s.RemoteAddr())
	}
	var byValue struct{ s session.Session }
	byValue.s.Init(8, e, message.Protobuf)
	if byValue.s.ID() != 8 || byValue.s.Serializer() != message.Protobuf {
		t.Fatal("Init in place")
	}
}

func TestBind(t *testing.T) {
	e := &binderEntity{}
	s := session.New(1, e, nil)
	for _, uid := range []int64{0, -1, math.MinInt64} {
		if err := s.Bind(uid); !errors.Is(err, session.ErrIllegalUID) {
			t.Errorf("Bind(%d): %v, want ErrIllegalUID", uid, err)
		}
	}
	if s.UID() != 0 || len(e.bound) != 0 {
		t.Fatalf("illegal Bind changed state: uid %d, entity told %v", s.UID(), e.bound)
	}
	if err := s.Bind(42); err != nil {
		t.Fatal(err)
	}
	if s.UID() != 42 || len(e.bound) != 1 || e.bound[0] != [2]int64{1, 42} {
		t.Fatalf("uid %d, entity told %v", s.UID(), e.bound)
	}
	s.SetUID(43) // mirrors: the entity is not told
	if s.UID() != 43 || len(e.bound) != 1 {
		t.Fatalf("SetUID: uid %d, entity told %v", s.UID(), e.bound)
	}
	// An entity without Bind is fine.
	if err := session.New(2, &recEntity{}, nil).Bind(1); err != nil {
		t.Fatal(err)
	}
}

func TestPushAndResponse(t *testing.T) {
	e := &recEntity{}
	s := session.New(1, e, nil)
	if err := s.Push("onChat", map[string]string{"a": "b"}); err != nil {
		t.Fatal(err)
	}
	if err := s.Push("raw", []byte("as is")); err != nil {
		t.Fatal(err)
	}
	if err := s.Response("x"); !errors.Is(err, session.ErrNoRequest) {
		t.Fatalf("Response with no request: %v", err)
	}
	if err := s.ResponseMID(0, "x"); !errors.Is(err, session.ErrNoRequest) {
		t.Fatalf("ResponseMID(0): %v", err)
	}
	if err := s.ResponseError(0, message.NewError(500, "x")); !errors.Is(err, session.ErrNoRequest) {
		t.Fatalf("ResponseError(0): %v", err)
	}
	s.SetLastMID(9)
	if s.LastMID() != 9 {
		t.Fatal("LastMID")
	}
	if err := s.Response(struct {
		N int `json:"n"`
	}{3}); err != nil {
		t.Fatal(err)
	}
	if err := s.ResponseMID(5, "later"); err != nil {
		t.Fatal(err)
	}
	if err := s.ResponseError(6, message.NewError(418, "teapot")); err != nil {
		t.Fatal(err)
	}
	if err := s.Push("bad", func() {}); err == nil {
		t.Fatal("Push of an unserializable value")
	}
	if err := s.ResponseMID(7, make(chan int)); err == nil {
		t.Fatal("Response of an unserializable value")
	}
	want := []call{
		{kind: "push", route: "onChat", data: `{"a":"b"}`},
		{kind: "push", route: "raw", data: "as is"},
		{kind: "response", mid: 9, data: `{"n":3}`},
		{kind: "response", mid: 5, data: `"later"`},
		{kind: "response", mid: 6, data: `{"code":418,"message":"teapot"}`, isErr: true},
	}
	got := e.got()
	if len(got) != len(want) {
		t.Fatalf("calls %+v", got)
	}
	for i := range want {
		if got[i].kind != want[i].kind || got[i].route != want[i].route || got[i].mid != want[i].mid ||
			got[i].data != want[i].data || got[i].isErr != want[i].isErr {
			t.Errorf("call %d: %+v, want %+v", i, got[i], want[i])
		}
	}
	e.err = errors.New("link down")
	if err := s.Push("x", 1); !errors.Is(err, e.err) {
		t.Fatalf("entity error not returned: %v", err)
	}
}

func TestClosedSession(t *testing.T) {
	e := &recEntity{}
	s := session.New(1, e, nil)
	if err := s.Kick("bye"); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if s.Closed() {
		t.Fatal("closed before Release")
	}
	s.Release()
	if !s.Closed() {
		t.Fatal("not closed after Release")
	}
	n := len(e.got())
	for name, err := range map[string]error{
		"Push":          s.Push("r", 1),
		"Response":      s.ResponseMID(3, 1),
		"ResponseError": s.ResponseError(3, message.NewError(500, "x")),
		"Kick":          s.Kick("again"),
		"Close":         s.Close(),
	} {
		if !errors.Is(err, session.ErrClosed) {
			t.Errorf("%s on a closed session: %v, want ErrClosed", name, err)
		}
	}
	if len(e.got()) != n {
		t.Fatalf("entity called after Release: %+v", e.got()[n:])
	}
}

func TestOnClose(t *testing.T) {
	s := session.New(1, &recEntity{}, nil)
	var order []int
	for i := range 5 {
		s.OnClose(func(got *session.Session) {
			if got != s {
				t.Error("callback got another session")
			}
			order = append(order, i)
		})
	}
	// A callback may register another: the session has ended, so it runs at once.
	s.OnClose(func(s *session.Session) { s.OnClose(func(*session.Session) { order = append(order, 99) }) })
	s.Release()
	s.Release() // later calls do nothing
	want := []int{0, 1, 2, 3, 4, 99}
	if len(order) != len(want) {
		t.Fatalf("callbacks ran %v, want %v", order, want)
	}
	for i := range want {
		if order[i] != want[i] {
			t.Fatalf("callbacks ran %v, want %v", order, want)
		}
	}
	ran := false
	s.OnClose(func(*session.Session) { ran = true })
	if !ran {
		t.Fatal("OnClose after Release did not run at once")
	}
}

func TestOnCloseConcurrentRelease(t *testing.T) {
	for range 200 {
		s := session.New(1, &recEntity{}, nil)
		var mu sync.Mutex
		runs := map[int]int{}
		var wg sync.WaitGroup
		for i := range 8 {
			wg.Go(func() {
				s.OnClose(func(*session.Session) { mu.Lock(); runs[i]++; mu.Unlock() })
			})
		}
		wg.Go(s.Release)
		wg.Go(s.Release)
		wg.Wait()
		for i := range 8 {
			if runs[i] != 1 {
				t.Fatalf("callback %d ran %d times", i, runs[i])
			}
		}
	}
}

func TestDataStore(t *testing.T) {
	s := session.New(1, &recEntity{}, nil)
	if s.Get("x") != nil || s.Has("x") || s.String("x") != "" || s.Int("x") != 0 || s.Bool("x") {
		t.Fatal("empty store")
	}
	s.Set("name", "ann")
	s.Set("admin", true)
	s.Set("level", 7)
	s.Set("gold", int64(1)<<40)
	s.Set("small", uint8(200))
	s.Set("ratio", 0.25)
	s.Set("f32", float32(1.5))
	if s.String("name") != "ann" || !s.Bool("admin") || !s.Has("level") {
		t.Fatal("string/bool")
	}
	if s.Int("level") != 7 || s.Int64("level") != 7 || s.Float64("level") != 7 {
		t.Fatalf("int: %d %d %v", s.Int("level"), s.Int64("level"), s.Float64("level"))
	}
	if s.Int64("gold") != 1<<40 || s.Float64("gold") != float64(int64(1)<<40) {
		t.Fatalf("int64: %d", s.Int64("gold"))
	}
	if s.Int("small") != 200 {
		t.Fatalf("uint8: %d", s.Int("small"))
	}
	if s.Float64("ratio") != 0.25 || s.Int("ratio") != 0 || s.Float64("f32") != 1.5 || s.Int("f32") != 1 {
		t.Fatal("float")
	}
	if big := s.Float64("big"); big != 0 {
		t.Fatal("missing")
	}
	s.Set("huge", uint64(math.MaxUint64))
	if f := s.Float64("huge"); f != float64(uint64(math.MaxUint64)) {
		t.Errorf("Float64 of uint64 max = %v, want %v", f, float64(uint64(math.MaxUint64)))
	}
	// Mismatched kinds give the zero value.
	if s.String("level") != "" || s.Bool("name") || s.Int("name") != 0 || s.Float64("admin") != 0 {
		t.Fatal("mismatched kinds")
	}

	// Values decoded from JSON are float64: the typed getters convert them.
	var decoded map[string]any
	if err := json.Unmarshal([]byte(`{"uid":12345,"score":99.5,"big":1e15,"name":"bo","vip":true,"neg":-3}`), &decoded); err != nil {
		t.Fatal(err)
	}
	s.SetData(decoded)
	if s.Int("uid") != 12345 || s.Int64("uid") != 12345 || s.Float64("uid") != 12345 {
		t.Errorf("uid: %d %d %v", s.Int("uid"), s.Int64("uid"), s.Float64("uid"))
	}
	if s.Float64("score") != 99.5 || s.Int("score") != 99 {
		t.Errorf("score: %v %d", s.Float64("score"), s.Int("score"))
	}
	if s.Int64("big") != 1e15 || s.Int("neg") != -3 {
		t.Errorf("big %d neg %d", s.Int64("big"), s.Int("neg"))
	}
	if s.String("name") != "bo" || !s.Bool("vip") {
		t.Error("string/bool from JSON")
	}
	if s.Has("level") {
		t.Error("SetData did not replace the store")
	}

	s.Remove("vip")
	if s.Has("vip") || s.Bool("vip") {
		t.Error("Remove")
	}
	s.Clear()
	if s.Has("uid") || len(s.Data()) != 0 {
		t.Error("Clear")
	}
	s.Set("after", 1) // the store works after Clear
	if s.Int("after") != 1 {
		t.Error("Set after Clear")
	}
}

func TestDataCopies(t *testing.T) {
	s := session.New(1, &recEntity{}, nil)
	in := map[string]any{"a": 1, "b": "two"}
	s.SetData(in)
	in["a"] = 100
	in["c"] = 3
	if s.Int("a") != 1 || s.Has("c") {
		t.Fatal("SetData kept the caller's map")
	}
	out := s.Data()
	out["a"] = 200
	delete(out, "b")
	if s.Int("a") != 1 || s.String("b") != "two" {
		t.Fatal("Data returned the store itself")
	}
	if len(out) != 1 || len(s.Data()) != 2 {
		t.Fatalf("Data %v", s.Data())
	}
	s.SetData(nil)
	if len(s.Data()) != 0 {
		t.Fatal("SetData(nil)")
	}
	s.Set("x", 1)
	if s.Int("x") != 1 {
		t.Fatal("Set after SetData(nil)")
	}
}

func TestDataConcurrent(t *testing.T) {
	s := session.New(1, &recEntity{}, nil)
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Go(func() {
			for i := range 500 {
				s.Set("k", i)
				_ = s.Int("k")
				_ = s.Data()
				if i%100 == 0 {
					s.SetData(map[string]any{"g": g})
				}
			}
		})
	}
	wg.Wait()
}

func TestQueue(t *testing.T) {
	s := session.New(1, &recEntity{}, nil)
	if s.Next() != nil || s.Pending() != 0 {
		t.Fatal("empty queue")
	}
	job := func(id uint64) *session.Job {
		return session.NewJob(&message.Message{Type: message.Request, ID: id, Route: "r", Data: []byte{byte(id)}})
	}
	sched, err := s.Enqueue(job(1), 3)
	if err != nil || !sched {
		t.Fatalf("first Enqueue on an idle queue: schedule=%v err=%v, want true", sched, err)
	}
	for id := uint64(2); id <= 3; id++ {
		if sched, err := s.Enqueue(job(id), 3); err != nil || sched {
			t.Fatalf("Enqueue %d on a running queue: schedule=%v err=%v, want false", id, sched, err)
		}
	}
	if _, err := s.Enqueue(job(4), 3); !errors.Is(err, session.ErrQueueFull) {
		t.Fatalf("Enqueue over max: %v", err)
	}
	if s.Pending() != 3 {
		t.Fatalf("pending %d", s.Pending())
	}
	for want := uint64(1); want <= 3; want++ {
		j := s.Next()
		if j == nil || j.Msg.ID != want || j.Msg.Data[0] != byte(want) {
			t.Fatalf("Next: %+v, want job %d (FIFO)", j, want)
		}
		j.Free()
	}
	// Still marked running until Next finds the queue empty.
	if sched, _ := s.Enqueue(job(5), 3); sched {
		t.Fatal("Enqueue before the drainer saw the empty queue must not reschedule")
	}
	if j := s.Next(); j == nil || j.Msg.ID != 5 {
		t.Fatalf("Next: %+v", j)
	}
	if s.Next() != nil {
		t.Fatal("Next on an empty queue")
	}
	// Now idle: the next Enqueue must schedule again.
	if sched, _ := s.Enqueue(job(6), 3); !sched {
		t.Fatal("Enqueue after the queue went idle did not ask to be scheduled")
	}
	// No limit when max <= 0.
	for id := uint64(7); id < 1000; id++ {
		if _, err := s.Enqueue(job(id), 0); err != nil {
			t.Fatalf("max 0: %v", err)
		}
	}
	if s.Pending() != 994 {
		t.Fatalf("pending %d", s.Pending())
	}
	for want := uint64(6); want < 1000; want++ {
		if j := s.Next(); j == nil || j.Msg.ID != want {
			t.Fatalf("Next: want %d", want)
		}
	}
	if s.Next() != nil || s.Pending() != 0 {
		t.Fatal("not empty")
	}
}

// TestQueueConcurrent: producers and one drainer that follows the schedule
// flag, as the dispatcher does. Exactly one scheduling per idle->busy
// transition, nothing lost, per-producer FIFO.
func TestQueueConcurrent(t *testing.T) {
	s := session.New(1, &recEntity{}, nil)
	const producers, per = 4, 2000
	sched := make(chan struct{}, producers*per)
	var wg sync.WaitGroup
	for p := range producers {
		wg.Go(func() {
			for i := range per {
				j := session.NewJob(&message.Message{ID: uint64(p)<<32 | uint64(i)})
				ok, err := s.Enqueue(j, 0)
				if err != nil {
					t.Error(err)
					return
				}
				if ok {
					sched <- struct{}{}
				}
			}
		})
	}
	last := make([]int64, producers)
	for i := range last {
		last[i] = -1
	}
	got := 0
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	running := false
	for got < producers*per {
		if !running {
			select {
			case <-sched:
				running = true
			case <-done:
				select {
				case <-sched:
					running = true
				default:
					t.Fatalf("producers done, %d of %d handled and nothing scheduled", got, producers*per)
				}
			}
		}
		j := s.Next()
		if j == nil {
			running = false
			continue
		}
		p, i := j.Msg.ID>>32, int64(j.Msg.ID&0xffffffff)
		if i != last[p]+1 {
			t.Fatalf("producer %d: job %d after %d", p, i, last[p])
		}
		last[p] = i
		j.Free()
		got++
	}
	if len(sched) != 0 {
		t.Fatalf("%d extra schedules", len(sched))
	}
}

func TestJob(t *testing.T) {
	buf := []byte("payload")
	m := &message.Message{Type: message.Notify, Route: "a.b", Data: buf}
	j := session.NewJob(m)
	copy(buf, "XXXXXXX")
	if string(j.Msg.Data) != "payload" || j.Msg.Route != "a.b" || j.Msg.Type != message.Notify {
		t.Fatalf("job did not copy the message: %+v", j.Msg)
	}
	d := j.Detach()
	if string(d) != "payload" {
		t.Fatalf("Detach: %q", d)
	}
	j.Free()
	// Pooled jobs must not hand the detached buffer to anyone else.
	for range 100 {
		j := session.NewJob(&message.Message{Data: []byte("other!!")})
		j.Free()
	}
	if string(d) != "payload" {
		t.Fatalf("detached buffer reused: %q", d)
	}
	if j := session.NewJob(&message.Message{}); len(j.Msg.Data) != 0 {
		t.Fatalf("empty job data %q", j.Msg.Data)
	}
}
