// Package handler turns components into routes: it registers a component's
// handler methods by reflection (nano's signatures), runs their lifecycle
// hooks, and dispatches messages to them — in arrival order per session,
// in parallel across sessions on a bounded pool, or on named serial
// executors — with panic recovery, coded error responses and pipelines.
package handler

import (
	"errors"
	"fmt"
	"reflect"
	"sort"
	"unicode"
	"unicode/utf8"

	"github.com/nanomesh/nanomesh/message"
	"github.com/nanomesh/nanomesh/session"
)

// Component is a group of handlers with lifecycle hooks. Embed Base to get
// no-op hooks.
type Component interface {
	Init()
	AfterInit()
	BeforeShutdown()
	Shutdown()
}

// Base implements Component with no-op hooks.
type Base struct{}

// Init implements Component.
func (Base) Init() {}

// AfterInit implements Component.
func (Base) AfterInit() {}

// BeforeShutdown implements Component.
func (Base) BeforeShutdown() {}

// Shutdown implements Component.
func (Base) Shutdown() {}

// Option configures how a component is registered.
type Option func(*compOptions)

type compOptions struct {
	name     string
	nameFunc func(string) string
	serial   string
}

// WithName sets the service name (default: the component's type name).
func WithName(name string) Option { return func(o *compOptions) { o.name = name } }

// WithNameFunc maps method names to route names, e.g. strings.ToLower.
func WithNameFunc(fn func(string) string) Option { return func(o *compOptions) { o.nameFunc = fn } }

// WithSerial runs all the component's handlers on the named serial executor:
// one goroutine shared by every component that names it, nano's default
// semantics, for game-loop state that must not be touched concurrently.
func WithSerial(executor string) Option { return func(o *compOptions) { o.serial = executor } }

// ErrBadHandler is returned by Register for a method that takes a
// *session.Session first but does not have a handler's signature.
var ErrBadHandler = errors.New("handler: bad handler signature")

// Handler is one registered handler method.
type Handler struct {
	Route   string
	service *Service
	method  reflect.Value // bound to the receiver
	argType reflect.Type  // pointer type for typed handlers
	raw     func(*session.Session, []byte) error
}

// Service is a registered component.
type Service struct {
	Name     string
	comp     Component
	serial   string
	Handlers map[string]*Handler
}

var (
	typeSession = reflect.TypeFor[*session.Session]()
	typeBytes   = reflect.TypeFor[[]byte]()
	typeError   = reflect.TypeFor[error]()
)

// Registry holds the registered services and their routes. Register every
// component before the registry is used to dispatch; it is read-only after.
type Registry struct {
	services []*Service
	routes   map[string]*Handler
}

// NewRegistry returns an empty registry.
func NewRegistry() *Registry { return &Registry{routes: make(map[string]*Handler)} }

// Register registers c's handler methods as routes "service.method".
func (r *Registry) Register(c Component, opts ...Option) error {
	var o compOptions
	for _, opt := range opts {
		opt(&o)
	}
	v := reflect.ValueOf(c)
	t := v.Type()
	name := o.name
	if name == "" {
		name = reflect.Indirect(v).Type().Name()
	}
	if name == "" {
		return fmt.Errorf("handler: component %s has no name (use WithName)", t)
	}
	for _, s := range r.services {
		if s.Name == name {
			return fmt.Errorf("handler: service %q registered twice", name)
		}
	}
	svc := &Service{Name: name, comp: c, serial: o.serial, Handlers: make(map[string]*Handler)}
	for i := 0; i < t.NumMethod(); i++ {
		m := t.Method(i)
		mt := m.Type
		if mt.NumIn() < 2 || mt.In(1) != typeSession {
			continue // not meant as a handler
		}
		if mt.NumIn() != 3 || mt.NumOut() != 1 || mt.Out(0) != typeError ||
			(mt.In(2) != typeBytes && mt.In(2).Kind() != reflect.Pointer) {
			return fmt.Errorf("%w: %s.%s is %s, want func(*session.Session, *T) error or func(*session.Session, []byte) error",
				ErrBadHandler, name, m.Name, mt)
		}
		mname := m.Name
		if o.nameFunc != nil {
			mname = o.nameFunc(mname)
		}
		route := name + "." + mname
		if len(route) > message.MaxRouteLen {
			return fmt.Errorf("handler: %w: %q", message.ErrRouteTooLong, route)
		}
		if _, dup := r.routes[route]; dup {
			return fmt.Errorf("handler: route %q registered twice", route)
		}
		if _, dup := svc.Handlers[mname]; dup {
			return fmt.Errorf("handler: route %q registered twice (method %s.%s maps onto another method's name)", route, name, m.Name)
		}
		h := &Handler{Route: route, service: svc, method: v.Method(i)}
		if mt.In(2) == typeBytes {
			h.raw = h.method.Interface().(func(*session.Session, []byte) error)
		} else {
			h.argType = mt.In(2)
		}
		svc.Handlers[mname] = h
	}
	if len(svc.Handlers) == 0 {
		return fmt.Errorf("handler: component %q has no handler methods", name)
	}
	for _, h := range svc.Handlers {
		r.routes[h.Route] = h
	}
	r.services = append(r.services, svc)
	return nil
}

// Lookup returns the handler of route.
func (r *Registry) Lookup(route string) (*Handler, bool) {
	h, ok := r.routes[route]
	return h, ok
}

// Routes returns every registered route, sorted.
func (r *Registry) Routes() []string {
	out := make([]string, 0, len(r.routes))
	for route := range r.routes {
		out = append(out, route)
	}
	sort.Strings(out)
	return out
}

// Services returns the registered services in registration order.
func (r *Registry) Services() []*Service { return r.services }

// Init runs Init on every component, then AfterInit, in registration order.
func (r *Registry) Init() {
	for _, s := range r.services {
		s.comp.Init()
	}
	for _, s := range r.services {
		s.comp.AfterInit()
	}
}

// BeforeShutdown runs BeforeShutdown on every component, in reverse order.
func (r *Registry) BeforeShutdown() {
	for i := len(r.services) - 1; i >= 0; i-- {
		r.services[i].comp.BeforeShutdown()
	}
}

// Shutdown runs Shutdown on every component, in reverse order.
func (r *Registry) Shutdown() {
	for i := len(r.services) - 1; i >= 0; i-- {
		r.services[i].comp.Shutdown()
	}
}

// LowerFirst lower-cases the first letter of a method name ("Join" ->
// "join"), the usual WithNameFunc for nano-style routes.
func LowerFirst(s string) string {
	r, n := utf8.DecodeRuneInString(s)
	if r == utf8.RuneError && n <= 1 { // empty or not UTF-8: leave it alone
		return s
	}
	return string(unicode.ToLower(r)) + s[n:]
}
