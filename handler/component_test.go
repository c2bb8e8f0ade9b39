package handler_test

import (
	"errors"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/nanomesh/nanomesh/handler"
	"github.com/nanomesh/nanomesh/message"
	"github.com/nanomesh/nanomesh/session"
)

type joinReq struct {
	Name string `json:"name"`
}

// Chat is a component with two handlers and methods that are not handlers.
type Chat struct{ handler.Base }

func (*Chat) Join(*session.Session, *joinReq) error      { return nil }
func (*Chat) SendMessage(*session.Session, []byte) error { return nil }
func (*Chat) Count() int                                 { return 0 }   // no session first: not a handler
func (*Chat) Reset(int, *session.Session) error          { return nil } // session not first: not a handler

func TestRegisterDefaultName(t *testing.T) {
	r := handler.NewRegistry()
	if err := r.Register(&Chat{}); err != nil {
		t.Fatal(err)
	}
	want := []string{"Chat.Join", "Chat.SendMessage"}
	if got := r.Routes(); !slices.Equal(got, want) {
		t.Fatalf("routes %v, want %v", got, want)
	}
	h, ok := r.Lookup("Chat.Join")
	if !ok || h.Route != "Chat.Join" {
		t.Fatalf("Lookup(Chat.Join) = %v, %v", h, ok)
	}
	if _, ok := r.Lookup("Chat.Count"); ok {
		t.Fatal("Count is not a handler")
	}
	svcs := r.Services()
	if len(svcs) != 1 || svcs[0].Name != "Chat" || len(svcs[0].Handlers) != 2 {
		t.Fatalf("services %+v", svcs)
	}
	if _, ok := svcs[0].Handlers["SendMessage"]; !ok {
		t.Fatalf("handlers keyed by mapped method name: %v", svcs[0].Handlers)
	}
}

// ValueComp has value-receiver handlers and is registered by value.
type ValueComp struct{ handler.Base }

func (ValueComp) Ping(*session.Session, []byte) error { return nil }

func TestRegisterValueReceiver(t *testing.T) {
	r := handler.NewRegistry()
	if err := r.Register(ValueComp{}); err != nil {
		t.Fatal(err)
	}
	if got := r.Routes(); !slices.Equal(got, []string{"ValueComp.Ping"}) {
		t.Fatalf("routes %v", got)
	}
}

func TestRegisterWithNameAndNameFunc(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts []handler.Option
		want []string
	}{
		{"WithName", []handler.Option{handler.WithName("chat")}, []string{"chat.Join", "chat.SendMessage"}},
		{"ToLower", []handler.Option{handler.WithName("room"), handler.WithNameFunc(strings.ToLower)},
			[]string{"room.join", "room.sendmessage"}},
		{"LowerFirst", []handler.Option{handler.WithName("room"), handler.WithNameFunc(handler.LowerFirst)},
			[]string{"room.join", "room.sendMessage"}},
		{"NameFuncOnly", []handler.Option{handler.WithNameFunc(handler.LowerFirst)},
			[]string{"Chat.join", "Chat.sendMessage"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := handler.NewRegistry()
			if err := r.Register(&Chat{}, tc.opts...); err != nil {
				t.Fatal(err)
			}
			if got := r.Routes(); !slices.Equal(got, tc.want) {
				t.Fatalf("routes %v, want %v", got, tc.want)
			}
		})
	}
}

func TestLowerFirst(t *testing.T) {
	for in, want := range map[string]string{"Join": "join", "SendMessage": "sendMessage", "X": "x",
		"already": "already", "Ärger": "ärger", "": ""} {
		if got := handler.LowerFirst(in); got != want {
			t.Errorf("LowerFirst(%q) = %q, want %q", in, got, want)
		}
	}
}

type badInt struct{ handler.Base }

func (*badInt) Do(*session.Session, int) error { return nil }

type badNoResult struct{ handler.Base }

func (*badNoResult) Do(*session.Session, *joinReq) {}

type badTwoResults struct{ handler.Base }

func (*badTwoResults) Do(*session.Session, *joinReq) (int, error) { return 0, nil }

type badResultType struct{ handler.Base }

func (*badResultType) Do(*session.Session, *joinReq) string { return "" }

type badOnlySession struct{ handler.Base }

func (*badOnlySession) Do(*session.Session) error { return nil }

type badThreeArgs struct{ handler.Base }

func (*badThreeArgs) Do(*session.Session, *joinReq, []byte) error { return nil }

type badStructArg struct{ handler.Base }

func (*badStructArg) Do(*session.Session, joinReq) error { return nil }

func TestRegisterBadSignature(t *testing.T) {
	for _, c := range []handler.Component{&badInt{}, &badNoResult{}, &badTwoResults{}, &badResultType{},
		&badOnlySession{}, &badThreeArgs{}, &badStructArg{}} {
		name := reflect.TypeOf(c).Elem().Name()
		t.Run(name, func(t *testing.T) {
			r := handler.NewRegistry()
			err := r.Register(c)
			if !errors.Is(err, handler.ErrBadHandler) {
				t.Fatalf("Register: %v, want ErrBadHandler", err)
			}
			if !strings.Contains(err.Error(), name+".Do") {
				t.Errorf("error %q does not name the method", err)
			}
			if len(r.Routes()) != 0 || len(r.Services()) != 0 {
				t.Errorf("failed Register left routes %v", r.Routes())
			}
		})
	}
}

// mixed has a good handler and a bad one: nothing of it may be registered.
type mixed struct{ handler.Base }

func (*mixed) Good(*session.Session, []byte) error { return nil }
func (*mixed) Zad(*session.Session, string) error  { return nil }

func TestRegisterBadLeavesNothing(t *testing.T) {
	r := handler.NewRegistry()
	if err := r.Register(&mixed{}); !errors.Is(err, handler.ErrBadHandler) {
		t.Fatalf("Register: %v", err)
	}
	if _, ok := r.Lookup("mixed.Good"); ok || len(r.Services()) != 0 {
		t.Fatal("partial registration")
	}
	// The name is still free.
	if err := r.Register(&Chat{}, handler.WithName("mixed")); err != nil {
		t.Fatal(err)
	}
}

type empty struct{ handler.Base }

func (*empty) Helper() {}

func TestRegisterNoHandlers(t *testing.T) {
	r := handler.NewRegistry()
	err := r.Register(&empty{})
	if err == nil || !strings.Contains(err.Error(), "no handler") {
		t.Fatalf("Register: %v, want a no-handler error", err)
	}
	if errors.Is(err, handler.ErrBadHandler) {
		t.Errorf("no handlers is not a bad signature: %v", err)
	}
	if err := r.Register(handler.Base{}, handler.WithName("base")); err == nil {
		t.Fatal("Base alone has no handlers")
	}
	if len(r.Services()) != 0 {
		t.Fatal("services registered")
	}
}

func TestRegisterDuplicateService(t *testing.T) {
	r := handler.NewRegistry()
	if err := r.Register(&Chat{}); err != nil {
		t.Fatal(err)
	}
	if err := r.Register(&Chat{}); err == nil {
		t.Fatal("second Chat registered")
	}
	if err := r.Register(&ValueComp{}, handler.WithName("Chat")); err == nil {
		t.Fatal("another component under the name Chat registered")
	}
	if err := r.Register(&Chat{}, handler.WithName("chat2")); err != nil {
		t.Fatalf("same type under another name: %v", err)
	}
	if len(r.Services()) != 2 {
		t.Fatalf("services: %d", len(r.Services()))
	}
}

// caseClash has two methods that strings.ToLower maps to one route.
type caseClash struct{ handler.Base }

func (*caseClash) Join(*session.Session, []byte) error { return nil }
func (*caseClash) JOIN(*session.Session, []byte) error { return nil }

func TestRegisterDuplicateRouteInComponent(t *testing.T) {
	r := handler.NewRegistry()
	err := r.Register(&caseClash{}, handler.WithNameFunc(strings.ToLower))
	if err == nil {
		t.Fatalf("two methods mapped to one route were accepted silently: routes %v", r.Routes())
	}
	if len(r.Routes()) != 0 {
		t.Fatalf("failed Register left routes %v", r.Routes())
	}
}

func TestRegisterDuplicateRouteAcrossServices(t *testing.T) {
	r := handler.NewRegistry()
	if err := r.Register(&ValueComp{}, handler.WithName("a.b")); err != nil { // a.b.Ping
		t.Fatal(err)
	}
	dotted := func(string) string { return "b.Ping" }
	if err := r.Register(ValueComp{}, handler.WithName("a"), handler.WithNameFunc(dotted)); err == nil {
		t.Fatal("route a.b.Ping registered twice")
	}
}

func TestRegisterRouteTooLong(t *testing.T) {
	r := handler.NewRegistry()
	long := strings.Repeat("s", message.MaxRouteLen-len(".Ping")) // exactly 255 bytes: fine
	if err := r.Register(ValueComp{}, handler.WithName(long)); err != nil {
		t.Fatalf("255-byte route: %v", err)
	}
	err := r.Register(ValueComp{}, handler.WithName(long+"s")) // 256 bytes
	if !errors.Is(err, message.ErrRouteTooLong) {
		t.Fatalf("256-byte route: %v, want ErrRouteTooLong", err)
	}
	if len(r.Routes()) != 1 {
		t.Fatalf("routes: %d", len(r.Routes()))
	}
}

type lifecycle struct {
	name string
	log  *[]string
}

func (l *lifecycle) Init()                               { *l.log = append(*l.log, "init "+l.name) }
func (l *lifecycle) AfterInit()                          { *l.log = append(*l.log, "after "+l.name) }
func (l *lifecycle) BeforeShutdown()                     { *l.log = append(*l.log, "before "+l.name) }
func (l *lifecycle) Shutdown()                           { *l.log = append(*l.log, "shutdown "+l.name) }
func (l *lifecycle) Ping(*session.Session, []byte) error { return nil }

func TestLifecycleOrder(t *testing.T) {
	var log []string
	r := handler.NewRegistry()
	for _, n := range []string{"a", "b", "c"} {
		if err := r.Register(&lifecycle{name: n, log: &log}, handler.WithName(n)); err != nil {
			t.Fatal(err)
		}
	}
	r.Init()
	r.BeforeShutdown()
	r.Shutdown()
	want := []string{"init a", "init b", "init c", "after a", "after b", "after c",
		"before c", "before b", "before a", "shutdown c", "shutdown b", "shutdown a"}
	if !slices.Equal(log, want) {
		t.Fatalf("lifecycle\n got %v\nwant %v", log, want)
	}
}
