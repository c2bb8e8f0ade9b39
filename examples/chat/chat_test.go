package main

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nanomesh/nanomesh/client"
	"github.com/nanomesh/nanomesh/node"
	"github.com/nanomesh/nanomesh/session"
	"github.com/rs/zerolog"
)

// startChat starts the chat node exactly as main does, on loopback ports
// chosen by the system.
func startChat(t *testing.T) *node.Node {
	t.Helper()
	log := zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel)
	n := newNode("127.0.0.1:0", "127.0.0.1:0", "/nano", log)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := n.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := n.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
	})
	return n
}

// chatter is a Go client of the chat room.
type chatter struct {
	c        *client.Client
	members  <-chan []byte
	newUsers <-chan []byte
	messages <-chan []byte
}

func dialChat(t *testing.T, addr string) *chatter {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := client.Dial(ctx, addr)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	return &chatter{
		c:        c,
		members:  c.Pushes("onMembers", 16),
		newUsers: c.Pushes("onNewUser", 16),
		messages: c.Pushes("onMessage", 16),
	}
}

// join requests room.join and checks nano's exact answer.
func (ch *chatter) join(t *testing.T) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var raw []byte
	if err := ch.c.Request(ctx, "room.join", nil, &raw); err != nil {
		t.Fatalf("room.join: %v", err)
	}
	if string(raw) != `{"code":0,"result":"success"}` {
		t.Fatalf("room.join answered %s", raw)
	}
}

func recv(t *testing.T, ch <-chan []byte, what string) []byte {
	t.Helper()
	select {
	case b, ok := <-ch:
		if !ok {
			t.Fatalf("%s: connection closed", what)
		}
		return b
	case <-time.After(5 * time.Second):
		t.Fatalf("%s: nothing within 5s", what)
		return nil
	}
}

func quiet(t *testing.T, ch <-chan []byte, what string) {
	t.Helper()
	select {
	case b := <-ch:
		t.Fatalf("%s: unexpected %s", what, b)
	case <-time.After(50 * time.Millisecond):
	}
}

func membersOf(t *testing.T, b []byte) []int64 {
	t.Helper()
	var m struct {
		Members []int64 `json:"members"`
	}
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatalf("onMembers %s: %v", b, err)
	}
	if m.Members == nil {
		t.Fatalf("onMembers %s: no members list", b)
	}
	slices.Sort(m.Members)
	return m.Members
}

// sessionIDs returns the ids of the node's sessions.
func sessionIDs(n *node.Node) []int64 {
	var ids []int64
	n.Agent().Range(func(s *session.Session) bool { ids = append(ids, s.ID()); return true })
	slices.Sort(ids)
	return ids
}

func TestChatGoClients(t *testing.T) {
	n := startChat(t)
	wsURL := "ws://" + n.WSAddr() + "/nano"

	a := dialChat(t, wsURL)
	a.join(t)
	if got := membersOf(t, recv(t, a.members, "a onMembers")); len(got) != 0 {
		t.Fatalf("first member sees members %v", got)
	}
	idA := sessionIDs(n)
	if len(idA) != 1 {
		t.Fatalf("sessions %v", idA)
	}

	b := dialChat(t, wsURL)
	b.join(t)
	if got := membersOf(t, recv(t, b.members, "b onMembers")); !slices.Equal(got, idA) {
		t.Fatalf("b sees members %v, want %v", got, idA)
	}
	var idB int64
	for _, id := range sessionIDs(n) {
		if id != idA[0] {
			idB = id
		}
	}
	var nu struct {
		Content string `json:"content"`
	}
	if err := json.Unmarshal(recv(t, a.newUsers, "a onNewUser"), &nu); err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf("New user: %d", idB); nu.Content != want {
		t.Fatalf("a got onNewUser %q, want %q", nu.Content, want)
	}
	quiet(t, b.newUsers, "b onNewUser") // the joiner is not told about itself

	// A TCP client joins the same room: main wires both transports.
	c := dialChat(t, "tcp://"+n.TCPAddr())
	c.join(t)
	if got := membersOf(t, recv(t, c.members, "c onMembers")); !slices.Equal(got, []int64{idA[0], idB}) {
		t.Fatalf("c sees members %v, want %v", got, []int64{idA[0], idB})
	}
	recv(t, a.newUsers, "a onNewUser for c")
	recv(t, b.newUsers, "b onNewUser for c")

	// room.message is a notify, broadcast as onMessage to everyone, the
	// sender included, with the same body.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := a.c.Notify(ctx, "room.message", map[string]string{"name": "ann", "content": "hello, room"}); err != nil {
		t.Fatal(err)
	}
	want := `{"name":"ann","content":"hello, room"}`
	for name, ch := range map[string]*chatter{"a": a, "b": b, "c": c} {
		if got := recv(t, ch.messages, name+" onMessage"); string(got) != want {
			t.Fatalf("%s got onMessage %s, want %s", name, got, want)
		}
	}
	if err := c.c.Notify(ctx, "room.message", map[string]string{"name": "tcp", "content": "über <b>"}); err != nil {
		t.Fatal(err)
	}
	bodyA, bodyB := recv(t, a.messages, "a onMessage"), recv(t, b.messages, "b onMessage")
	if string(bodyA) != string(bodyB) || !strings.Contains(string(bodyA), "über") {
		t.Fatalf("bodies differ: %s / %s", bodyA, bodyB)
	}
	recv(t, c.messages, "c onMessage")

	// A client that leaves is removed from the room: later joiners do not
	// see it and broadcasts do not reach it.
	count := n.Agent().Count()
	a.c.Close()
	deadline := time.Now().Add(5 * time.Second)
	for n.Agent().Count() >= count {
		if time.Now().After(deadline) {
			t.Fatal("server did not notice the closed connection")
		}
		time.Sleep(5 * time.Millisecond)
	}
	d := dialChat(t, wsURL)
	d.join(t)
	if got := membersOf(t, recv(t, d.members, "d onMembers")); slices.Contains(got, idA[0]) {
		t.Fatalf("closed session %d still in the room: %v", idA[0], got)
	}
}

// TestChatConcurrentJoins: clients that join at the same time must still
// learn of each other, through onMembers or onNewUser (nano runs the room
// on one goroutine; here different sessions run in parallel).
func TestChatConcurrentJoins(t *testing.T) {
	// room.Join reads the members, broadcasts and adds in three steps; the
	// room's serial executor (room.Options) makes that one step.
	n := startChat(t)
	wsURL := "ws://" + n.WSAddr() + "/nano"
	const k = 8
	for round := range 10 {
		cs := make([]*chatter, k)
		for i := range cs {
			cs[i] = dialChat(t, wsURL)
		}
		errs := make(chan error, k)
		for _, c := range cs {
			go func() {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				errs <- c.c.Request(ctx, "room.join", nil, nil)
			}()
		}
		for range k {
			if err := <-errs; err != nil {
				t.Fatal(err)
			}
		}
		// Everyone's view: members at join + later newcomers.
		known := make([]map[string]bool, k)
		for i, c := range cs {
			known[i] = map[string]bool{}
			for _, id := range membersOf(t, recv(t, c.members, "onMembers")) {
				known[i][fmt.Sprint(id)] = true
			}
		drain:
			for {
				select {
				case b := <-c.newUsers:
					var nu struct{ Content string }
					_ = json.Unmarshal(b, &nu)
					known[i][strings.TrimPrefix(nu.Content, "New user: ")] = true
				case <-time.After(30 * time.Millisecond):
					break drain
				}
			}
		}
		ids := sessionIDs(n)
		// Each pair must be known in at least one direction... in fact both:
		// the earlier joiner hears onNewUser, the later one sees it in onMembers.
		for i := range cs {
			if len(known[i]) < len(ids)-1 {
				t.Fatalf("round %d: client %d knows %d of the %d others", round, i, len(known[i]), len(ids)-1)
			}
		}
		for _, c := range cs {
			c.c.Close()
		}
		for n.Agent().Count() > 0 {
			time.Sleep(5 * time.Millisecond)
		}
	}
}
