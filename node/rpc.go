package node

import (
	"context"
	"fmt"
	"math/rand/v2"

	"github.com/nanomesh/nanomesh/message"
	"github.com/nanomesh/nanomesh/node/clusterpb"
	"github.com/nanomesh/nanomesh/session"
)

// ErrNoRoute is returned by RPC and Notify when no node serves the route.
var ErrNoRoute = errNoRoute

// RPC calls the handler of route with req, on this node if it serves the
// route or else on a node of the cluster that does, and decodes the handler's
// response into resp (which may be nil). The handler runs against a session
// with no client; errors it returns come back as *message.Error.
func (n *Node) RPC(ctx context.Context, route string, req, resp any) error {
	data, err := n.opts.ser.Marshal(req)
	if err != nil {
		return fmt.Errorf("node: rpc %s: %w", route, err)
	}
	out, err := n.call(ctx, route, data, false)
	if err != nil || resp == nil {
		return err
	}
	if err := n.opts.ser.Unmarshal(out, resp); err != nil {
		return fmt.Errorf("node: rpc %s: decode response: %w", route, err)
	}
	return nil
}

// Notify runs the handler of route with v, here or on a node that serves it,
// without waiting for the handler.
func (n *Node) Notify(ctx context.Context, route string, v any) error {
	data, err := n.opts.ser.Marshal(v)
	if err != nil {
		return fmt.Errorf("node: notify %s: %w", route, err)
	}
	_, err = n.call(ctx, route, data, true)
	return err
}

func (n *Node) call(ctx context.Context, route string, data []byte, notify bool) ([]byte, error) {
	if _, ok := n.reg.Lookup(route); ok || n.cluster == nil {
		return n.callLocal(ctx, route, data, notify)
	}
	c := n.cluster
	var cands []*peer
	for _, m := range c.disc.Table().ByService(serviceOf(route)) {
		if m.ID == c.self.ID {
			continue
		}
		p, err := c.peer(m)
		if err == nil && p.usable() {
			cands = append(cands, p)
		}
	}
	if len(cands) == 0 {
		return nil, fmt.Errorf("%w: %s", ErrNoRoute, route)
	}
	p := cands[rand.IntN(len(cands))]
	r, err := p.cli.Call(ctx, &clusterpb.CallRequest{Route: route, Data: data, Notify: notify})
	if err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("node: rpc %s: %w", route, ctx.Err())
		}
		return nil, &message.Error{Code: message.CodeBadGateway, Message: fmt.Sprintf("%s: %v", p.id, err)}
	}
	if r.Code != 0 {
		return nil, &message.Error{Code: int(r.Code), Message: r.Message}
	}
	return r.Data, nil
}

// callLocal runs route's local handler for a server-to-server call.
func (n *Node) callLocal(ctx context.Context, route string, data []byte, notify bool) ([]byte, error) {
	if _, ok := n.reg.Lookup(route); !ok {
		return nil, message.NewError(message.CodeNotFound, "route %q not found", route)
	}
	e := &callEntity{ch: make(chan callResult, 1), ser: n.opts.ser}
	s := session.New(0, e, n.opts.ser)
	m := &message.Message{Type: message.Request, ID: 1, Route: route, Data: data}
	if notify {
		m.Type, m.ID = message.Notify, 0
	}
	if err := n.disp.Dispatch(s, m); err != nil {
		return nil, err
	}
	if notify {
		return nil, nil
	}
	select {
	case r := <-e.ch:
		return r.data, r.err
	case <-ctx.Done():
		return nil, fmt.Errorf("node: rpc %s: %w", route, ctx.Err())
	}
}
