package handler_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nanomesh/nanomesh/handler"
	"github.com/nanomesh/nanomesh/message"
	"github.com/nanomesh/nanomesh/session"
)

// svc is the component under test, registered as "t" (lower-first routes).
type svc struct {
	handler.Base

	started chan uint64   // Block: the request id, once running
	release chan struct{} // Block: returns when closed or sent to

	mu       sync.Mutex
	kept     [][]byte   // Keep: the payloads, kept past the handler's return
	typed    []*joinReq // Typed: the decoded arguments
	notifyRe []error    // Note: what s.Response returned in a notify handler
	seqs     map[int64][]int
	seqDone  *sync.WaitGroup
}

func newSvc() *svc {
	return &svc{started: make(chan uint64, 16), release: make(chan struct{}), seqs: map[int64][]int{}}
}

func (c *svc) Echo(s *session.Session, data []byte) error { return s.Response(data) }

func (c *svc) Typed(s *session.Session, req *joinReq) error {
	c.mu.Lock()
	c.typed = append(c.typed, req)
	c.mu.Unlock()
	return s.Response(&joinReq{Name: strings.ToUpper(req.Name)})
}

func (c *svc) Keep(s *session.Session, data []byte) error {
	c.mu.Lock()
	c.kept = append(c.kept, data)
	c.mu.Unlock()
	return nil
}

func (c *svc) Fail(*session.Session, []byte) error {
	return fmt.Errorf("wrapped: %w", message.NewError(418, "teapot"))
}

func (c *svc) Plain(*session.Session, []byte) error { return errors.New("plain failure") }

func (c *svc) Panic(*session.Session, []byte) error { panic("handler exploded") }

func (c *svc) Note(s *session.Session, _ []byte) error {
	err := s.Response("nope")
	c.mu.Lock()
	c.notifyRe = append(c.notifyRe, err)
	c.mu.Unlock()
	return nil
}

func (c *svc) Block(s *session.Session, _ []byte) error {
	c.started <- s.LastMID()
	<-c.release
	return s.Response("released")
}

// Seq records the sequence number in data for the session.
func (c *svc) Seq(s *session.Session, data []byte) error {
	n, err := strconv.Atoi(string(data))
	if err != nil {
		return err
	}
	c.mu.Lock()
	c.seqs[s.ID()] = append(c.seqs[s.ID()], n)
	c.mu.Unlock()
	if c.seqDone != nil {
		c.seqDone.Done()
	}
	return nil
}

// game is a component on the serial executor "game", registered as "g".
type game struct {
	handler.Base
	svc     *svc // shares Seq's bookkeeping
	running atomic.Int32
	overlap atomic.Bool
	gid     atomic.Uint64 // goroutine of the last handler
}

func (g *game) Seq(s *session.Session, data []byte) error {
	if g.running.Add(1) > 1 {
		g.overlap.Store(true)
	}
	defer g.running.Add(-1)
	g.gid.Store(goid())
	return g.svc.Seq(s, data)
}

func (g *game) Panic(*session.Session, []byte) error { panic("game exploded") }

func (g *game) Echo(s *session.Session, data []byte) error {
	g.gid.Store(goid())
	return s.Response(data)
}

// goid returns the current goroutine's id.
func goid() uint64 {
	var buf [64]byte
	b := buf[:runtime.Stack(buf[:], false)]
	b = bytes.TrimPrefix(b, []byte("goroutine "))
	n, _ := strconv.ParseUint(string(b[:bytes.IndexByte(b, ' ')]), 10, 64)
	return n
}

type fixture struct {
	d   *handler.Dispatcher
	svc *svc
	g   *game
}

func start(t testing.TB, opts ...handler.DispatcherOption) *fixture {
	t.Helper()
	c := newSvc()
	g := &game{svc: c}
	r := handler.NewRegistry()
	if err := r.Register(c, handler.WithName("t"), handler.WithNameFunc(handler.LowerFirst)); err != nil {
		t.Fatal(err)
	}
	if err := r.Register(g, handler.WithName("g"), handler.WithNameFunc(handler.LowerFirst),
		handler.WithSerial("game")); err != nil {
		t.Fatal(err)
	}
	d := handler.NewDispatcher(r, opts...)
	d.Start()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := d.Stop(ctx); err != nil {
			t.Errorf("Stop: %v", err)
		}
	})
	return &fixture{d: d, svc: c, g: g}
}

var sids atomic.Int64

func newSession() (*session.Session, *recEntity) {
	e := newRecEntity()
	return session.New(sids.Add(1), e, nil), e
}

func req(id uint64, route, data string) *message.Message {
	return &message.Message{Type: message.Request, ID: id, Route: route, Data: []byte(data)}
}

func notify(route, data string) *message.Message {
	return &message.Message{Type: message.Notify, Route: route, Data: []byte(data)}
}

func dispatch(t testing.TB, d *handler.Dispatcher, s *session.Session, m *message.Message) {
	t.Helper()
	if err := d.Dispatch(s, m); err != nil {
		t.Fatalf("Dispatch %s: %v", m, err)
	}
}

func TestDispatchRequest(t *testing.T) {
	f := start(t)
	s, e := newSession()
	dispatch(t, f.d, s, req(1, "t.echo", "hello"))
	if got := e.wantResponse(t, 1); got != "hello" {
		t.Fatalf("echo: %q", got)
	}
	dispatch(t, f.d, s, req(2, "t.typed", `{"name":"ann"}`))
	if got := e.wantResponse(t, 2); got != `{"name":"ANN"}` {
		t.Fatalf("typed: %q", got)
	}
	// An empty body gives the typed handler a zero value, not a nil pointer.
	dispatch(t, f.d, s, req(3, "t.typed", ""))
	if got := e.wantResponse(t, 3); got != `{"name":""}` {
		t.Fatalf("typed, empty body: %q", got)
	}
	// The serial component answers too.
	dispatch(t, f.d, s, req(4, "g.echo", "on the executor"))
	if got := e.wantResponse(t, 4); got != "on the executor" {
		t.Fatalf("serial echo: %q", got)
	}
}

func TestDispatchTypedPointerArgFresh(t *testing.T) {
	f := start(t)
	s, e := newSession()
	for i := range 3 {
		dispatch(t, f.d, s, req(uint64(i+1), "t.typed", fmt.Sprintf(`{"name":"n%d"}`, i)))
		e.wantResponse(t, uint64(i+1))
	}
	f.svc.mu.Lock()
	defer f.svc.mu.Unlock()
	if len(f.svc.typed) != 3 {
		t.Fatalf("typed calls: %d", len(f.svc.typed))
	}
	for i, r := range f.svc.typed {
		if r.Name != fmt.Sprintf("n%d", i) {
			t.Errorf("arg %d: %+v (reused or overwritten)", i, r)
		}
		for _, o := range f.svc.typed[:i] {
			if o == r {
				t.Errorf("arg %d shares its pointer with an earlier call", i)
			}
		}
	}
}

func TestDispatchErrors(t *testing.T) {
	f := start(t)
	s, e := newSession()

	dispatch(t, f.d, s, req(1, "t.missing", ""))
	if me := e.wantError(t, 1, message.CodeNotFound); !strings.Contains(me.Message, "t.missing") {
		t.Errorf("404 message %q", me.Message)
	}
	dispatch(t, f.d, s, req(2, "t.typed", "{not json"))
	e.wantError(t, 2, message.CodeBadRequest)
	dispatch(t, f.d, s, req(3, "t.fail", ""))
	if me := e.wantError(t, 3, 418); me.Message != "teapot" {
		t.Errorf("coded error message %q", me.Message)
	}
	dispatch(t, f.d, s, req(4, "t.plain", ""))
	if me := e.wantError(t, 4, message.CodeInternal); me.Message != "plain failure" {
		t.Errorf("plain error message %q", me.Message)
	}
	// Failed notifies are not answered.
	for _, r := range []string{"t.missing", "t.typed", "t.fail", "t.plain", "t.panic"} {
		dispatch(t, f.d, s, notify(r, "{bad"))
	}
	e.none(t, 50*time.Millisecond)
	// And the session still works.
	dispatch(t, f.d, s, req(5, "t.echo", "alive"))
	if got := e.wantResponse(t, 5); got != "alive" {
		t.Fatalf("echo after errors: %q", got)
	}
}

func TestDispatchNotifyHasNoRequest(t *testing.T) {
	f := start(t)
	s, e := newSession()
	dispatch(t, f.d, s, req(7, "t.echo", "x"))
	e.wantResponse(t, 7)
	dispatch(t, f.d, s, notify("t.note", ""))
	dispatch(t, f.d, s, req(8, "t.echo", "y"))
	e.wantResponse(t, 8)
	f.svc.mu.Lock()
	defer f.svc.mu.Unlock()
	if len(f.svc.notifyRe) != 1 || !errors.Is(f.svc.notifyRe[0], session.ErrNoRequest) {
		t.Fatalf("Response in a notify handler: %v, want ErrNoRequest (not an answer to request 7)", f.svc.notifyRe)
	}
}

func TestInboundPipeline(t *testing.T) {
	var order []string
	var mu sync.Mutex
	first := func(s *session.Session, m *message.Message) error {
		mu.Lock()
		order = append(order, "first "+m.Route)
		mu.Unlock()
		return nil
	}
	second := func(s *session.Session, m *message.Message) error {
		mu.Lock()
		order = append(order, "second "+m.Route)
		mu.Unlock()
		switch string(m.Data) {
		case "deny":
			return message.NewError(message.CodeUnauthorized, "not logged in")
		case "plain":
			return errors.New("pipeline broke")
		case "panic":
			panic("pipeline exploded")
		}
		return nil
	}
	f := start(t, handler.WithInbound(first), handler.WithInbound(second))
	s, e := newSession()

	dispatch(t, f.d, s, req(1, "t.keep", "deny"))
	if me := e.wantError(t, 1, message.CodeUnauthorized); me.Message != "not logged in" {
		t.Errorf("message %q", me.Message)
	}
	dispatch(t, f.d, s, req(2, "t.keep", "plain"))
	e.wantError(t, 2, message.CodeInternal)
	dispatch(t, f.d, s, req(3, "t.keep", "panic"))
	e.wantError(t, 3, message.CodeInternal)
	dispatch(t, f.d, s, notify("t.keep", "deny"))
	dispatch(t, f.d, s, req(4, "g.echo", "deny")) // serial components go through it too
	e.wantError(t, 4, message.CodeUnauthorized)
	dispatch(t, f.d, s, req(5, "t.echo", "ok"))
	if got := e.wantResponse(t, 5); got != "ok" {
		t.Fatalf("echo: %q", got)
	}
	e.none(t, 20*time.Millisecond)

	f.svc.mu.Lock()
	kept := len(f.svc.kept)
	f.svc.mu.Unlock()
	if kept != 0 {
		t.Errorf("handler ran %d times despite the pipeline refusing", kept)
	}
	mu.Lock()
	defer mu.Unlock()
	want := []string{"first t.keep", "second t.keep", "first t.keep", "second t.keep", "first t.keep", "second t.keep",
		"first t.keep", "second t.keep", "first g.echo", "second g.echo", "first t.echo", "second t.echo"}
	if strings.Join(order, ",") != strings.Join(want, ",") {
		t.Errorf("pipeline order\n got %v\nwant %v", order, want)
	}
}

func TestPanicRecovered(t *testing.T) {
	f := start(t)
	s, e := newSession()
	for i := uint64(1); i <= 3; i++ {
		dispatch(t, f.d, s, req(i*10, "t.panic", ""))
		if me := e.wantError(t, i*10, message.CodeInternal); strings.Contains(me.Message, "exploded") {
			t.Errorf("panic value leaked to the client: %q", me.Message)
		}
		dispatch(t, f.d, s, req(i*10+1, "t.echo", "still here"))
		if got := e.wantResponse(t, i*10+1); got != "still here" {
			t.Fatalf("after panic: %q", got)
		}
	}
	// A panic on the serial executor does not kill it.
	dispatch(t, f.d, s, req(100, "g.panic", ""))
	e.wantError(t, 100, message.CodeInternal)
	dispatch(t, f.d, s, req(101, "g.echo", "executor alive"))
	if got := e.wantResponse(t, 101); got != "executor alive" {
		t.Fatalf("after serial panic: %q", got)
	}
	if s.Closed() {
		t.Fatal("session closed by a panic")
	}
}

func TestRawPayloadOwnership(t *testing.T) {
	f := start(t)
	s, e := newSession()
	buf := make([]byte, 0, 64) // the caller's read buffer, reused for every message
	const n = 200
	for i := range n {
		buf = fmt.Appendf(buf[:0], "payload-%03d", i)
		dispatch(t, f.d, s, &message.Message{Type: message.Notify, Route: "t.keep", Data: buf})
		for j := range buf { // the caller reuses its buffer at once
			buf[j] = '!'
		}
	}
	dispatch(t, f.d, s, req(1, "t.echo", ""))
	if got := e.wantResponse(t, 1); got != "" {
		t.Fatalf("echo of empty payload: %q", got)
	}
	// More traffic through the job pool after the handler returned.
	for i := range n {
		dispatch(t, f.d, s, req(uint64(i+2), "t.echo", strings.Repeat("z", 11)))
		e.wantResponse(t, uint64(i+2))
	}
	// A raw handler of an empty payload gets an empty, non-nil slice.
	dispatch(t, f.d, s, notify("t.keep", ""))
	dispatch(t, f.d, s, req(999, "t.echo", ""))
	e.wantResponse(t, 999)

	f.svc.mu.Lock()
	defer f.svc.mu.Unlock()
	if len(f.svc.kept) != n+1 {
		t.Fatalf("kept %d payloads", len(f.svc.kept))
	}
	for i, b := range f.svc.kept[:n] {
		if want := fmt.Sprintf("payload-%03d", i); string(b) != want {
			t.Fatalf("kept payload %d = %q, want %q (buffer reused)", i, b, want)
		}
	}
	if last := f.svc.kept[n]; last == nil || len(last) != 0 {
		t.Fatalf("empty payload: %#v", last)
	}
}

// TestOrderPerSession sends interleaved messages to a pooled and a serial
// component from many sessions at once: every session's messages must be
// handled exactly once, in the order they were dispatched.
func TestOrderPerSession(t *testing.T) {
	f := start(t, handler.WithWorkers(8), handler.WithMaxPending(0))
	const sessions, per = 40, 250
	var done sync.WaitGroup
	done.Add(sessions * per)
	f.svc.seqDone = &done
	ss := make([]*session.Session, sessions)
	for i := range ss {
		ss[i], _ = newSession()
	}
	var wg sync.WaitGroup
	for _, s := range ss {
		wg.Go(func() {
			for i := range per {
				route := "t.seq"
				if i%3 == 0 {
					route = "g.seq"
				}
				if err := f.d.Dispatch(s, &message.Message{Type: message.Notify, Route: route, Data: []byte(strconv.Itoa(i))}); err != nil {
					t.Error(err)
					return
				}
				if i%50 == 0 {
					runtime.Gosched()
				}
			}
		})
	}
	wg.Wait()
	waitTimeout(t, &done, 20*time.Second)
	f.svc.mu.Lock()
	defer f.svc.mu.Unlock()
	for _, s := range ss {
		got := f.svc.seqs[s.ID()]
		if len(got) != per {
			t.Fatalf("session %d: %d messages handled, want %d", s.ID(), len(got), per)
		}
		for i, n := range got {
			if n != i {
				t.Fatalf("session %d: message %d handled at position %d: %v", s.ID(), n, i, got[max(0, i-3):min(len(got), i+3)])
			}
		}
	}
	if f.g.overlap.Load() {
		t.Fatal("serial executor ran two handlers at once")
	}
}

func waitTimeout(t *testing.T, wg *sync.WaitGroup, d time.Duration) {
	t.Helper()
	ch := make(chan struct{})
	go func() { wg.Wait(); close(ch) }()
	select {
	case <-ch:
	case <-time.After(d):
		t.Fatal("timed out")
	}
}

// TestSessionsRunInParallel blocks one session's handler until another
// session's handler has run: that needs two workers at once.
func TestSessionsRunInParallel(t *testing.T) {
	f := start(t, handler.WithWorkers(2))
	s1, e1 := newSession()
	s2, e2 := newSession()
	dispatch(t, f.d, s1, req(1, "t.block", ""))
	if id := <-f.svc.started; id != 1 {
		t.Fatalf("started %d", id)
	}
	// s1 is busy; its next message waits, s2's does not.
	dispatch(t, f.d, s1, req(2, "t.echo", "s1"))
	dispatch(t, f.d, s2, req(3, "t.echo", "s2"))
	if got := e2.wantResponse(t, 3); got != "s2" {
		t.Fatalf("s2: %q", got)
	}
	e1.none(t, 20*time.Millisecond)
	close(f.svc.release)
	if got := e1.wantResponse(t, 1); got != `"released"` {
		t.Fatalf("s1 first: %q", got)
	}
	if got := e1.wantResponse(t, 2); got != "s1" {
		t.Fatalf("s1 second: %q", got)
	}
}

func TestSerialExecutorOneGoroutine(t *testing.T) {
	f := start(t, handler.WithWorkers(4))
	if _, ok := f.d.Executor("game"); !ok {
		t.Fatal("no executor game")
	}
	if _, ok := f.d.Executor("nope"); ok {
		t.Fatal("executor nope exists")
	}
	gids := map[uint64]bool{}
	for i := range 20 {
		s, e := newSession()
		dispatch(t, f.d, s, req(uint64(i+1), "g.echo", "x"))
		e.wantResponse(t, uint64(i+1))
		gids[f.g.gid.Load()] = true
	}
	if len(gids) != 1 {
		t.Fatalf("serial handlers ran on %d goroutines", len(gids))
	}
}

func TestExecutorEvery(t *testing.T) {
	f := start(t)
	s, e := newSession()
	dispatch(t, f.d, s, req(1, "g.echo", ""))
	e.wantResponse(t, 1)
	execGID := f.g.gid.Load()

	ex, _ := f.d.Executor("game")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var ticks atomic.Int32
	var bad atomic.Uint64
	ex.Every(ctx, 2*time.Millisecond, func() {
		if g := goid(); g != execGID {
			bad.Store(g)
		}
		ticks.Add(1)
	})
	deadline := time.Now().Add(5 * time.Second)
	for ticks.Load() < 5 {
		if time.Now().After(deadline) {
			t.Fatalf("%d ticks in 5s", ticks.Load())
		}
		time.Sleep(time.Millisecond)
	}
	if g := bad.Load(); g != 0 {
		t.Fatalf("tick ran on goroutine %d, executor is %d", g, execGID)
	}
	cancel()
	time.Sleep(10 * time.Millisecond) // a tick already queued may still run
	n := ticks.Load()
	time.Sleep(30 * time.Millisecond)
	if m := ticks.Load(); m != n {
		t.Fatalf("ticks went on after cancel: %d -> %d", n, m)
	}
}

func TestMaxPending(t *testing.T) {
	f := start(t, handler.WithMaxPending(2))
	s, e := newSession()
	dispatch(t, f.d, s, req(1, "t.block", ""))
	<-f.svc.started // taken off the queue: the queue is empty again
	dispatch(t, f.d, s, req(2, "t.echo", "a"))
	dispatch(t, f.d, s, req(3, "t.echo", "b"))
	if err := f.d.Dispatch(s, req(4, "t.echo", "c")); !errors.Is(err, session.ErrQueueFull) {
		t.Fatalf("third pending message: %v, want ErrQueueFull", err)
	}
	if s.Pending() != 2 {
		t.Fatalf("pending %d", s.Pending())
	}
	// Other sessions are not affected.
	s2, e2 := newSession()
	dispatch(t, f.d, s2, req(5, "t.echo", "other"))
	e2.wantResponse(t, 5)
	close(f.svc.release)
	e.wantResponse(t, 1)
	e.wantResponse(t, 2)
	e.wantResponse(t, 3)
	e.none(t, 20*time.Millisecond)
	dispatch(t, f.d, s, req(6, "t.echo", "room again"))
	e.wantResponse(t, 6)
}

func TestDrain(t *testing.T) {
	f := start(t)
	s, e := newSession()
	dispatch(t, f.d, s, req(1, "t.block", ""))
	<-f.svc.started
	dispatch(t, f.d, s, req(2, "t.echo", "queued")) // queued behind the blocked handler

	drained := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		drained <- f.d.Drain(ctx)
	}()
	select {
	case err := <-drained:
		t.Fatalf("Drain returned with a handler in flight: %v", err)
	case <-time.After(50 * time.Millisecond):
	}

	// While draining: requests get 503 at once, notifies are dropped.
	s2, e2 := newSession()
	if err := f.d.Dispatch(s2, req(10, "t.echo", "late")); err != nil {
		t.Fatalf("Dispatch while draining: %v", err)
	}
	e2.wantError(t, 10, message.CodeUnavailable)
	if err := f.d.Dispatch(s2, notify("t.keep", "late")); err != nil {
		t.Fatalf("notify while draining: %v", err)
	}
	e2.none(t, 20*time.Millisecond)

	close(f.svc.release)
	select {
	case err := <-drained:
		if err != nil {
			t.Fatalf("Drain: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Drain did not return")
	}
	// Everything queued before Drain was handled.
	e.wantResponse(t, 1)
	if got := e.wantResponse(t, 2); got != "queued" {
		t.Fatalf("queued: %q", got)
	}
	dispatch(t, f.d, s, req(3, "t.echo", "after"))
	e.wantError(t, 3, message.CodeUnavailable)
	f.svc.mu.Lock()
	defer f.svc.mu.Unlock()
	if len(f.svc.kept) != 0 {
		t.Fatal("notify handled while draining")
	}
}

func TestDrainTimeout(t *testing.T) {
	f := start(t)
	s, _ := newSession()
	dispatch(t, f.d, s, req(1, "t.block", ""))
	<-f.svc.started
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := f.d.Drain(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Drain: %v, want DeadlineExceeded", err)
	}
	close(f.svc.release)
}

func TestStopBounded(t *testing.T) {
	c := newSvc()
	r := handler.NewRegistry()
	if err := r.Register(c, handler.WithName("t"), handler.WithNameFunc(handler.LowerFirst)); err != nil {
		t.Fatal(err)
	}
	d := handler.NewDispatcher(r, handler.WithWorkers(2))
	d.Start()
	s, _ := newSession()
	dispatch(t, d, s, req(1, "t.block", ""))
	<-c.started

	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	t0 := time.Now()
	err := d.Stop(ctx)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Stop with a stuck handler: %v", err)
	}
	if el := time.Since(t0); el > 2*time.Second {
		t.Fatalf("Stop took %v", el)
	}
	// Stopped: requests get 503.
	s2, e2 := newSession()
	dispatch(t, d, s2, req(2, "t.echo", ""))
	e2.wantError(t, 2, message.CodeUnavailable)

	close(c.release)
	ctx2, cancel2 := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel2()
	if err := d.Stop(ctx2); err != nil {
		t.Fatalf("second Stop once the handler returned: %v", err)
	}
}

func TestRemoteHook(t *testing.T) {
	var got []string
	var mu sync.Mutex
	remote := func(s *session.Session, j *session.Job) bool {
		if !strings.HasPrefix(j.Msg.Route, "far.") {
			return false
		}
		mu.Lock()
		got = append(got, j.Msg.Route+":"+string(j.Msg.Data))
		mu.Unlock()
		_ = s.ResponseMID(j.Msg.ID, "forwarded")
		j.Free()
		return true
	}
	f := start(t, handler.WithRemote(remote))
	s, e := newSession()
	dispatch(t, f.d, s, req(1, "far.away", "x"))
	if got := e.wantResponse(t, 1); got != `"forwarded"` {
		t.Fatalf("remote: %q", got)
	}
	dispatch(t, f.d, s, req(2, "near.missing", ""))
	e.wantError(t, 2, message.CodeNotFound)
	dispatch(t, f.d, s, req(3, "t.echo", "local"))
	e.wantResponse(t, 3)
	mu.Lock()
	defer mu.Unlock()
	if len(got) != 1 || got[0] != "far.away:x" {
		t.Fatalf("remote saw %v", got)
	}
}

// countEntity counts responses.
type countEntity struct {
	nopEntity
	n atomic.Int64
}

func (e *countEntity) Response(uint64, []byte, bool) error { e.n.Add(1); return nil }

type lateComp struct {
	handler.Base
	drained atomic.Bool
	late    atomic.Int64
}

func (c *lateComp) Work(s *session.Session, d []byte) error {
	if c.drained.Load() {
		c.late.Add(1)
	}
	return s.Response(d)
}

// TestDrainRacingDispatch drains while clients keep sending. No handler may
// start after Drain returned, every request Dispatch accepted gets exactly
// one answer (a response or a 503), and nothing may panic (Dispatch used to
// Add to a WaitGroup at zero while Drain waited on it: "WaitGroup is reused
// before previous Wait has returned").
func TestDrainRacingDispatch(t *testing.T) {
	deadline := time.Now().Add(time.Second)
	iters := 0
	for ; time.Now().Before(deadline) || iters < 20; iters++ {
		c := &lateComp{}
		r := handler.NewRegistry()
		if err := r.Register(c, handler.WithName("x")); err != nil {
			t.Fatal(err)
		}
		d := handler.NewDispatcher(r, handler.WithWorkers(2), handler.WithMaxPending(16))
		d.Start()
		var stop atomic.Bool
		var accepted atomic.Int64
		var wg sync.WaitGroup
		ents := make([]*countEntity, 4)
		for k := range ents {
			ents[k] = &countEntity{}
			s := session.New(int64(k+1), ents[k], nil)
			wg.Go(func() {
				for i := uint64(1); !stop.Load(); i++ {
					if d.Dispatch(s, &message.Message{Type: message.Request, ID: i, Route: "x.Work"}) == nil {
						accepted.Add(1)
					}
					runtime.Gosched()
				}
			})
		}
		time.Sleep(100 * time.Microsecond)
		if err := d.Drain(context.Background()); err != nil {
			t.Fatal(err)
		}
		c.drained.Store(true)
		time.Sleep(50 * time.Microsecond)
		stop.Store(true)
		wg.Wait()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if err := d.Stop(ctx); err != nil {
			t.Fatal(err)
		}
		cancel()
		if n := c.late.Load(); n > 0 {
			t.Fatalf("iteration %d: %d handlers ran after Drain returned", iters, n)
		}
		var answered int64
		for _, e := range ents {
			answered += e.n.Load()
		}
		if answered != accepted.Load() {
			t.Fatalf("iteration %d: %d requests accepted, %d answered", iters, accepted.Load(), answered)
		}
	}
	t.Logf("%d iterations", iters)
}
