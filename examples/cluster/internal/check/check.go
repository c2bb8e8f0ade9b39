// Package check drives the chat room through a gate as two users would:
// both join, one speaks, both must hear it. The multi-process test and the
// docker compose smoke test share it.
package check

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/nanomesh/nanomesh/client"
	"github.com/nanomesh/nanomesh/examples/chat/room"
)

// Result describes a successful check.
type Result struct {
	// Attempts is how many tries Until needed (1 for Chat).
	Attempts int
	// Broadcast is the time from sending the message to both users having it.
	Broadcast time.Duration
}

// Chat connects two clients to addr ("tcp://host:port" or
// "ws://host:port/path"), joins both to the room, sends a message from the
// first and waits until both receive it. Both being in one room proves that
// the gate routed them to the same chat node.
func Chat(ctx context.Context, addr string) (Result, error) {
	a, err := join(ctx, addr)
	if err != nil {
		return Result{}, fmt.Errorf("first user: %w", err)
	}
	defer a.Close()
	b, err := join(ctx, addr)
	if err != nil {
		return Result{}, fmt.Errorf("second user: %w", err)
	}
	defer b.Close()

	want := fmt.Sprintf("hello %016x", rand.Uint64())
	start := time.Now()
	if err := a.c.Notify(ctx, "room.message", &room.Message{Name: "check", Content: want}); err != nil {
		return Result{}, err
	}
	for i, u := range []*user{a, b} {
		if err := u.await(ctx, want); err != nil {
			return Result{}, fmt.Errorf("user %d: %w", i+1, err)
		}
	}
	return Result{Attempts: 1, Broadcast: time.Since(start)}, nil
}

// Until runs Chat, each try bounded by per, until one succeeds or ctx ends,
// pausing pause between tries. It returns the last error on failure.
func Until(ctx context.Context, addr string, per, pause time.Duration) (Result, error) {
	var last error
	for n := 1; ; n++ {
		tctx, cancel := context.WithTimeout(ctx, per)
		r, err := Chat(tctx, addr)
		cancel()
		if err == nil {
			r.Attempts = n
			return r, nil
		}
		last = err
		select {
		case <-ctx.Done():
			return Result{Attempts: n}, fmt.Errorf("after %d tries: %w", n, last)
		case <-time.After(pause):
		}
	}
}

type user struct {
	c   *client.Client
	msg <-chan []byte
}

func (u *user) Close() { _ = u.c.Close() }

func join(ctx context.Context, addr string) (*user, error) {
	c, err := client.Dial(ctx, addr)
	if err != nil {
		return nil, err
	}
	u := &user{c: c, msg: c.Pushes("onMessage", 64)}
	var resp room.JoinResponse
	if err := c.Request(ctx, "room.join", nil, &resp); err != nil {
		c.Close()
		return nil, fmt.Errorf("room.join: %w", err)
	}
	if resp.Code != 0 || resp.Result != "success" {
		c.Close()
		return nil, fmt.Errorf("room.join: answered %+v", resp)
	}
	return u, nil
}

// await waits for the chat line want; other lines (other users) are skipped.
func (u *user) await(ctx context.Context, want string) error {
	for {
		select {
		case b, ok := <-u.msg:
			if !ok {
				return errors.New("connection closed before the broadcast")
			}
			var m room.Message
			if json.Unmarshal(b, &m) == nil && m.Content == want {
				return nil
			}
		case <-ctx.Done():
			return fmt.Errorf("no broadcast: %w", ctx.Err())
		}
	}
}
