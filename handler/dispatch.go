package handler

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"runtime"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nanomesh/nanomesh/message"
	"github.com/nanomesh/nanomesh/session"
	"github.com/rs/zerolog"
)

// Inbound runs before a handler; an error answers a request with that error
// (a *message.Error keeps its code, anything else is 500) and drops a notify.
type Inbound func(s *session.Session, m *message.Message) error

// Remote takes messages for routes with no local handler, e.g. to forward
// them to another node. It reports whether it took the job; if it did, it
// owns the job and must Free it.
type Remote func(s *session.Session, j *session.Job) bool

// DispatcherOption configures a Dispatcher.
type DispatcherOption func(*Dispatcher)

// WithWorkers sets the size of the worker pool (default 4 x GOMAXPROCS, at least 16).
func WithWorkers(n int) DispatcherOption { return func(d *Dispatcher) { d.workers = n } }

// WithMaxPending sets how many messages may wait per session (default 256).
func WithMaxPending(n int) DispatcherOption { return func(d *Dispatcher) { d.maxPending = n } }

// WithInbound appends inbound pipeline stages, run in order.
func WithInbound(fns ...Inbound) DispatcherOption {
	return func(d *Dispatcher) { d.inbound = append(d.inbound, fns...) }
}

// WithRemote sets the hook for routes with no local handler.
func WithRemote(fn Remote) DispatcherOption { return func(d *Dispatcher) { d.remote = fn } }

// WithLogger sets the dispatcher's logger (handler errors at debug, panics at error).
func WithLogger(l zerolog.Logger) DispatcherOption { return func(d *Dispatcher) { d.log = l } }

// ErrStopped is returned by Dispatch once the dispatcher stops taking work.
var ErrStopped = errors.New("handler: dispatcher stopped")

// Dispatcher runs handlers. Messages of one session run one at a time in
// arrival order; different sessions run in parallel on a fixed pool of
// workers. A handler of a component registered WithSerial runs on that
// executor's goroutine instead, still in order for its session.
type Dispatcher struct {
	reg        *Registry
	workers    int
	maxPending int
	inbound    []Inbound
	remote     Remote
	log        zerolog.Logger

	runq    chan *session.Session
	serials map[string]*Executor
	// state counts the messages dispatched and not yet handled, with
	// drainBit set once draining starts: one atomic word, so that a Dispatch
	// either is counted before Drain looks or sees that draining began.
	state    atomic.Int64
	idle     chan struct{} // closed once draining and nothing is in flight
	idleOnce sync.Once
	stop     chan struct{}
	wg       sync.WaitGroup
	once     sync.Once
}

// NewDispatcher returns a dispatcher for the routes of reg.
func NewDispatcher(reg *Registry, opts ...DispatcherOption) *Dispatcher {
	d := &Dispatcher{
		reg:        reg,
		workers:    max(16, 4*runtime.GOMAXPROCS(0)),
		maxPending: 256,
		log:        zerolog.Nop(),
		stop:       make(chan struct{}),
		idle:       make(chan struct{}),
		serials:    make(map[string]*Executor),
	}
	for _, opt := range opts {
		opt(d)
	}
	d.runq = make(chan *session.Session, 1<<16)
	for _, s := range reg.services {
		if s.serial != "" && d.serials[s.serial] == nil {
			d.serials[s.serial] = newExecutor(s.serial, d.log)
		}
	}
	return d
}

// Start starts the worker pool and the serial executors.
func (d *Dispatcher) Start() {
	for range d.workers {
		d.wg.Add(1)
		go d.work()
	}
	for _, e := range d.serials {
		e.start(&d.wg, d.stop)
	}
}

// Executor returns the named serial executor, if a component uses it.
func (d *Dispatcher) Executor(name string) (*Executor, bool) {
	e, ok := d.serials[name]
	return e, ok
}

// Dispatch queues m (copied) for s. While draining it answers requests with
// 503 and drops notifies. It returns session.ErrQueueFull when s has too many
// messages waiting. It never blocks on a handler.
func (d *Dispatcher) Dispatch(s *session.Session, m *message.Message) error {
	if !d.admit() {
		if m.Type == message.Request {
			_ = s.ResponseError(m.ID, message.NewError(message.CodeUnavailable, "shutting down"))
		}
		return nil
	}
	j := session.NewJob(m)
	schedule, err := s.Enqueue(j, d.maxPending)
	if err != nil {
		d.finish()
		j.Free()
		return err
	}
	if schedule {
		d.runq <- s
	}
	return nil
}

// Drain stops taking new messages (requests get 503) and waits, bounded by
// ctx, until every queued message has been handled.
func (d *Dispatcher) Drain(ctx context.Context) error {
	d.startDrain()
	select {
	case <-d.idle:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("handler: drain: %w", ctx.Err())
	}
}

// Stop stops the workers and executors and waits, bounded by ctx, for the
// handlers still running to return. Call Drain first to finish queued work.
func (d *Dispatcher) Stop(ctx context.Context) error {
	d.startDrain()
	d.once.Do(func() { close(d.stop) })
	done := make(chan struct{})
	go func() { d.wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("handler: stop: handlers still running: %w", ctx.Err())
	}
}

const drainBit = 1 << 62

// startDrain makes Dispatch refuse new messages.
func (d *Dispatcher) startDrain() {
	if d.state.Or(drainBit) == 0 {
		d.idleOnce.Do(func() { close(d.idle) })
	}
}

// admit counts one more message in flight, unless draining has begun.
func (d *Dispatcher) admit() bool {
	if d.state.Load()&drainBit != 0 {
		return false // draining: leave the count alone so that it can reach zero
	}
	if d.state.Add(1)&drainBit != 0 {
		d.finish() // draining began meanwhile
		return false
	}
	return true
}

// finish marks one admitted message as handled.
func (d *Dispatcher) finish() {
	if d.state.Add(-1) == drainBit {
		d.idleOnce.Do(func() { close(d.idle) })
	}
}

func (d *Dispatcher) work() {
	defer d.wg.Done()
	for {
		select {
		case <-d.stop:
			return
		case s := <-d.runq:
			d.drain(s)
		}
	}
}

// drain handles up to a batch of s's jobs, then yields the worker.
func (d *Dispatcher) drain(s *session.Session) {
	for i := 0; i < 64; i++ {
		j := s.Next()
		if j == nil {
			return
		}
		h, ok := d.reg.routes[j.Msg.Route]
		if ok && h.service.serial != "" {
			// Continue this session on the serial executor; it resumes the
			// session's queue on the pool when the handler is done.
			d.serials[h.service.serial].Submit(func() {
				d.handle(s, h, j)
				d.resume(s)
			})
			return
		}
		d.handle(s, h, j)
	}
	d.resume(s)
}

// resume puts a session that is still marked running back on the run queue.
func (d *Dispatcher) resume(s *session.Session) {
	select {
	case d.runq <- s:
	default:
		d.drain(s) // run queue full: keep going here rather than block
	}
}

func (d *Dispatcher) handle(s *session.Session, h *Handler, j *session.Job) {
	defer d.finish()
	m := &j.Msg
	if h == nil {
		if d.remote != nil && d.remote(s, j) {
			return
		}
		d.fail(s, m, message.NewError(message.CodeNotFound, "route %q not found", m.Route))
		j.Free()
		return
	}
	d.call(s, h, j)
}

func (d *Dispatcher) call(s *session.Session, h *Handler, j *session.Job) {
	m := &j.Msg
	defer func() {
		if r := recover(); r != nil {
			d.log.Error().Str("route", m.Route).Int64("session", s.ID()).
				Interface("panic", r).Bytes("stack", debug.Stack()).Msg("handler panic")
			d.fail(s, m, message.NewError(message.CodeInternal, "internal error"))
		}
		j.Free()
	}()
	for _, in := range d.inbound {
		if err := in(s, m); err != nil {
			d.fail(s, m, err)
			return
		}
	}
	s.SetLastMID(m.ID)
	var err error
	if h.raw != nil {
		data := j.Detach() // the handler may keep it
		if data == nil {
			data = []byte{}
		}
		err = h.raw(s, data)
	} else {
		arg := reflect.New(h.argType.Elem())
		if len(m.Data) > 0 {
			if uerr := s.Serializer().Unmarshal(m.Data, arg.Interface()); uerr != nil {
				d.fail(s, m, message.NewError(message.CodeBadRequest, "bad request body: %v", uerr))
				return
			}
		}
		out := h.method.Call([]reflect.Value{reflect.ValueOf(s), arg})
		err, _ = out[0].Interface().(error)
	}
	if err != nil {
		d.fail(s, m, err)
	}
}

// fail answers a request with err as a coded error; a failed notify is only logged.
func (d *Dispatcher) fail(s *session.Session, m *message.Message, err error) {
	var me *message.Error
	if !errors.As(err, &me) {
		me = &message.Error{Code: message.CodeInternal, Message: err.Error()}
	}
	d.log.Debug().Err(err).Str("route", m.Route).Int64("session", s.ID()).Msg("handler failed")
	if m.Type == message.Request {
		_ = s.ResponseError(m.ID, me)
	}
}

// Executor is a named serial executor: one goroutine that runs submitted
// functions in order.
type Executor struct {
	name string
	ch   chan func()
	log  zerolog.Logger
}

func newExecutor(name string, log zerolog.Logger) *Executor {
	return &Executor{name: name, ch: make(chan func(), 4096), log: log}
}

func (e *Executor) start(wg *sync.WaitGroup, stop <-chan struct{}) {
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			case fn := <-e.ch:
				e.run(fn)
			}
		}
	}()
}

func (e *Executor) run(fn func()) {
	defer func() {
		if r := recover(); r != nil {
			e.log.Error().Str("executor", e.name).Interface("panic", r).Bytes("stack", debug.Stack()).Msg("executor task panic")
		}
	}()
	fn()
}

// Submit queues fn to run on the executor's goroutine.
func (e *Executor) Submit(fn func()) { e.ch <- fn }

// Every runs fn on the executor every d until ctx is done: a game-loop tick
// that shares the goroutine of the executor's handlers.
func (e *Executor) Every(ctx context.Context, d time.Duration, fn func()) {
	go func() {
		t := time.NewTicker(d)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				select { // not Submit: a stopped executor must not keep this goroutine forever
				case e.ch <- fn:
				case <-ctx.Done():
					return
				}
			}
		}
	}()
}
