// Package room is nano's chat demo room as a nanomesh component: wire
// compatible with nano's chat web client. Register it with Options().
package room

import (
	"fmt"
	"strings"

	"github.com/nanomesh/nanomesh/handler"
	"github.com/nanomesh/nanomesh/session"
)

type (
	// JoinResponse answers room.join.
	JoinResponse struct {
		Code   int    `json:"code"`
		Result string `json:"result"`
	}
	// Members is pushed as onMembers to a new member.
	Members struct {
		Members []int64 `json:"members"`
	}
	// NewUser is broadcast as onNewUser when someone joins.
	NewUser struct {
		Content string `json:"content"`
	}
	// Message is a chat line: notify room.message, broadcast as onMessage.
	Message struct {
		Name    string `json:"name"`
		Content string `json:"content"`
	}
)

// Room is one chat room shared by every client of the node.
type Room struct {
	handler.Base
	group *session.Group
}

// New returns an empty room.
func New() *Room { return &Room{group: session.NewGroup("room", nil)} }

// Options are the registration options that give nano's routes room.join
// and room.message. The room runs on one serial executor, nano's default
// semantics: Join reads the members, announces the newcomer and adds it as
// one step, so concurrent joiners all learn of each other.
func Options() []handler.Option {
	return []handler.Option{handler.WithName("room"), handler.WithNameFunc(strings.ToLower), handler.WithSerial("room")}
}

// Group returns the room's members.
func (r *Room) Group() *session.Group { return r.group }

// Join adds the session to the room: it binds the session id as the user id,
// pushes the current members to the joiner, announces the newcomer to the
// room and answers {"code":0,"result":"success"}.
func (r *Room) Join(s *session.Session, _ []byte) error {
	if err := s.Bind(s.ID()); err != nil {
		return err
	}
	if err := s.Push("onMembers", &Members{Members: r.group.Members()}); err != nil {
		return err
	}
	_ = r.group.Broadcast("onNewUser", &NewUser{Content: fmt.Sprintf("New user: %d", s.ID())})
	if err := r.group.Add(s); err != nil {
		return err
	}
	return s.Response(&JoinResponse{Result: "success"})
}

// Message broadcasts a chat line to the room.
func (r *Room) Message(s *session.Session, msg *Message) error {
	return r.group.Broadcast("onMessage", msg)
}
