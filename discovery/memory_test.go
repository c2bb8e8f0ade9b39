package discovery

import (
	"context"
	"errors"
	"runtime"
	"testing"
)

func TestMemoryMembership(t *testing.T) {
	ctx := context.Background()
	base := runtime.NumGoroutine()
	c := NewMemoryCluster()
	a, b, x := c.Join(), c.Join(), c.Join()
	recB, cancel := record(b)
	defer cancel()

	ma := member("a", "chat")
	if err := a.Register(ctx, ma); err != nil {
		t.Fatal(err)
	}
	if !a.Routable() || !has(a, "a")() || !has(b, "a")() {
		t.Fatal("a not registered everywhere")
	}
	if err := a.Register(ctx, member("a")); !errors.Is(err, ErrRegistered) {
		t.Fatalf("second Register: %v", err)
	}
	if err := x.Register(ctx, member("a")); !errors.Is(err, ErrDuplicateID) {
		t.Fatalf("duplicate Register: %v", err)
	}
	if x.Routable() || x.Self() != nil {
		t.Fatal("x registered after a refusal")
	}
	mb := member("b", "chat")
	if err := b.Register(ctx, mb); err != nil {
		t.Fatal(err)
	}
	if ma.Num == 0 || mb.Num == 0 || ma.Num == mb.Num {
		t.Fatalf("numbers a=%d b=%d", ma.Num, mb.Num)
	}
	// A late joiner starts with the current members.
	late := c.Join()
	if l := late.Table().ByService("chat"); len(l) != 2 || l[0].ID != "a" || l[1].ID != "b" {
		t.Fatalf("ByService(chat) = %v", l)
	}
	recLate, cancelLate := record(late)
	defer cancelLate()

	if err := a.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if has(b, "a")() || a.Routable() {
		t.Fatal("a still present after Close")
	}
	waitFor(t, "b's events "+recB.String(), recB.contains("put:a", "put:b", "delete:a"))
	waitFor(t, "late's events "+recLate.String(), recLate.contains("put:a", "put:b", "delete:a"))
	if err := a.Register(ctx, member("a")); !errors.Is(err, ErrClosed) {
		t.Fatalf("Register after Close: %v", err)
	}

	// Evict simulates a crash.
	if !c.Evict("b") || b.Routable() || has(late, "b")() {
		t.Fatal("evict failed")
	}
	waitFor(t, "late's events "+recLate.String(), recLate.contains("put:b", "delete:b"))

	// The number freed by a is reused.
	mx := member("x")
	if err := x.Register(ctx, mx); err != nil {
		t.Fatal(err)
	}
	if mx.Num != ma.Num {
		t.Fatalf("x got %d, want the freed %d", mx.Num, ma.Num)
	}
	for _, d := range []*Memory{a, b, x, late} {
		d.Close(ctx)
	}
	checkNoLeak(t, base)
}

func TestSubscribeCancel(t *testing.T) {
	ctx := context.Background()
	d := NewMemory()
	defer d.Close(ctx)
	got := make(chan Event, 10)
	var cancel func()
	cancel = d.Subscribe(func(ev Event) {
		got <- ev
		cancel() // allowed from within fn
	})
	if err := d.Register(ctx, member("a")); err != nil {
		t.Fatal(err)
	}
	if ev := <-got; ev.Type != EventPut || ev.Member.ID != "a" {
		t.Fatalf("event %+v", ev)
	}
	other := NewMemoryCluster().Join()
	other.Close(ctx)
	if err := other.Register(ctx, member("b")); !errors.Is(err, ErrClosed) {
		t.Fatalf("Register on closed: %v", err)
	}
	d.Close(ctx)
	select {
	case ev := <-got:
		t.Fatalf("event after cancel: %+v", ev)
	default:
	}
}

func TestMemberClone(t *testing.T) {
	m := member("a", "chat")
	m.Labels = map[string]string{"zone": "1"}
	c := m.Clone()
	c.Labels["zone"] = "2"
	c.Services[0].Routes[0] = "x"
	c.ClientAddrs["ws"] = "y"
	if m.Labels["zone"] != "1" || m.Services[0].Routes[0] != "chat.hello" || m.ClientAddrs["ws"] != "127.0.0.1:2" {
		t.Fatal("Clone shares state")
	}
	if !m.Serves("chat") || m.Serves("room") {
		t.Fatal("Serves")
	}
}
