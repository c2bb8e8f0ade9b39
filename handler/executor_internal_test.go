package handler

import (
	"context"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/nanomesh/nanomesh/session"
)

type loop struct{ Base }

func (loop) Tick(*session.Session, []byte) error { return nil }

// everyGoroutines counts the goroutines running an Every loop.
func everyGoroutines() int {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	return strings.Count(string(buf), "(*Executor).Every.func")
}

// TestEveryEndsWhenExecutorIsGone: once its executor no longer takes work
// (the dispatcher stopped, and the queue filled up with ticks), an Every loop
// must still end when its context is done instead of blocking forever on
// Submit.
func TestEveryEndsWhenExecutorIsGone(t *testing.T) {
	base := everyGoroutines()
	r := NewRegistry()
	if err := r.Register(loop{}, WithSerial("game")); err != nil {
		t.Fatal(err)
	}
	d := NewDispatcher(r)
	d.Start()
	if err := d.Stop(context.Background()); err != nil {
		t.Fatal(err)
	}
	e, _ := d.Executor("game")
	for len(e.ch) < cap(e.ch) { // what 4096 ticks after Stop would do
		e.ch <- func() {}
	}
	ctx, cancel := context.WithCancel(context.Background())
	e.Every(ctx, time.Millisecond, func() {})
	time.Sleep(20 * time.Millisecond) // a tick is now blocked on the full queue
	if n := everyGoroutines(); n != base+1 {
		t.Fatalf("Every goroutines: %d, want %d", n, base+1)
	}
	cancel()
	deadline := time.Now().Add(2 * time.Second)
	for everyGoroutines() != base {
		if time.Now().After(deadline) {
			t.Fatal("Every goroutine still running after its context was cancelled (blocked in Submit)")
		}
		time.Sleep(5 * time.Millisecond)
	}
}
