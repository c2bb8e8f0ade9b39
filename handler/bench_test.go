package handler_test

import (
	"sync/atomic"
	"testing"

	"github.com/nanomesh/nanomesh/handler"
	"github.com/nanomesh/nanomesh/message"
	"github.com/nanomesh/nanomesh/session"
)

type benchReq struct {
	Name  string `json:"name"`
	Count int    `json:"count"`
}

type benchResp struct {
	OK    bool `json:"ok"`
	Count int  `json:"count"`
}

type benchComp struct{ handler.Base }

func (benchComp) Raw(s *session.Session, data []byte) error { return s.Response(data) }

func (benchComp) Typed(s *session.Session, r *benchReq) error {
	return s.Response(&benchResp{OK: true, Count: r.Count + 1})
}

// benchEntity counts responses and signals when want have arrived.
type benchEntity struct {
	nopEntity
	n    *atomic.Int64
	want int64
	done chan struct{}
}

func (e *benchEntity) Response(uint64, []byte, bool) error {
	if e.n.Add(1) == e.want {
		close(e.done)
	}
	return nil
}

// benchDispatch measures Dispatch + handler + response through a no-op
// entity. pipelined: b.N requests spread over 64 sessions, waiting once for
// all the answers; roundtrip: one session, each request answered before the
// next is sent.
func benchDispatch(b *testing.B, route string, data []byte) {
	r := handler.NewRegistry()
	if err := r.Register(benchComp{}, handler.WithName("b"), handler.WithNameFunc(handler.LowerFirst)); err != nil {
		b.Fatal(err)
	}
	b.Run("pipelined", func(b *testing.B) {
		d := handler.NewDispatcher(r, handler.WithMaxPending(0))
		d.Start()
		defer d.Stop(b.Context())
		var n atomic.Int64
		e := &benchEntity{n: &n, want: int64(b.N), done: make(chan struct{})}
		ss := make([]*session.Session, 64)
		for i := range ss {
			ss[i] = session.New(int64(i+1), e, nil)
		}
		m := message.Message{Type: message.Request, Route: route, Data: data}
		b.ReportAllocs()
		b.ResetTimer()
		for i := range b.N {
			m.ID = uint64(i + 1)
			if err := d.Dispatch(ss[i%len(ss)], &m); err != nil {
				b.Fatal(err)
			}
		}
		<-e.done
	})
	b.Run("roundtrip", func(b *testing.B) {
		d := handler.NewDispatcher(r)
		d.Start()
		defer d.Stop(b.Context())
		var n atomic.Int64
		ch := make(chan struct{}, 1)
		e := &signalEntity{n: &n, ch: ch}
		s := session.New(1, e, nil)
		m := message.Message{Type: message.Request, Route: route, Data: data}
		b.ReportAllocs()
		b.ResetTimer()
		for i := range b.N {
			m.ID = uint64(i + 1)
			if err := d.Dispatch(s, &m); err != nil {
				b.Fatal(err)
			}
			<-ch
		}
	})
}

type signalEntity struct {
	nopEntity
	n  *atomic.Int64
	ch chan struct{}
}

func (e *signalEntity) Response(uint64, []byte, bool) error {
	e.n.Add(1)
	e.ch <- struct{}{}
	return nil
}

func BenchmarkDispatchRaw(b *testing.B) {
	benchDispatch(b, "b.raw", []byte(`{"name":"bench","count":41}`))
}

func BenchmarkDispatchTyped(b *testing.B) {
	benchDispatch(b, "b.typed", []byte(`{"name":"bench","count":41}`))
}
