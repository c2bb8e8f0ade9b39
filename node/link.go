package node

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"sync"

	"github.com/nanomesh/nanomesh/message"
	"github.com/nanomesh/nanomesh/node/clusterpb"
	"github.com/nanomesh/nanomesh/session"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// link is the backend's side of one gate's Link stream: the remote sessions
// of that gate and a send goroutine for everything going back to it.
type link struct {
	c     *cluster
	gate  string
	sendq chan *clusterpb.Downstream
	done  chan struct{}

	mu       sync.Mutex
	sessions map[int64]*remoteSession
}

// Link implements clusterpb.ClusterServer.
func (c *cluster) Link(st clusterpb.Cluster_LinkServer) error {
	gate := "unknown"
	if md, ok := metadata.FromIncomingContext(st.Context()); ok && len(md.Get(mdNode)) > 0 {
		gate = md.Get(mdNode)[0]
	}
	l := &link{c: c, gate: gate, sendq: make(chan *clusterpb.Downstream, 4096),
		done: make(chan struct{}), sessions: make(map[int64]*remoteSession)}
	c.mu.Lock()
	c.links[l] = struct{}{}
	c.nlinks++
	c.mu.Unlock()
	defer c.linkDone()
	if c.draining.Load() {
		l.drainNotice()
	}

	errc := make(chan error, 1)
	go func() {
		for {
			select {
			case <-l.done:
				errc <- nil
				return
			case d := <-l.sendq:
				if err := st.Send(d); err != nil {
					errc <- err
					return
				}
			}
		}
	}()
	var err error
	for {
		var up *clusterpb.Upstream
		if up, err = st.Recv(); err != nil {
			break
		}
		switch k := up.Kind.(type) {
		case *clusterpb.Upstream_Forward:
			l.onForward(k.Forward)
		case *clusterpb.Upstream_Closed:
			l.release(k.Closed.SessionId)
		}
	}
	close(l.done)
	<-errc
	c.mu.Lock()
	delete(c.links, l)
	c.mu.Unlock()
	l.mu.Lock()
	all := l.sessions
	l.sessions = nil
	l.mu.Unlock()
	for _, rs := range all {
		rs.sess.Release()
	}
	return nil
}

// drainNotice tells the gate that this node is leaving: a Retry response
// with no message id (requests always have one).
func (l *link) drainNotice() {
	_ = l.send(&clusterpb.Downstream{Kind: &clusterpb.Downstream_Response{Response: &clusterpb.Response{Retry: true}}})
}

func (l *link) onForward(f *clusterpb.Forward) {
	rs := l.session(f.Session)
	if rs == nil {
		return
	}
	m := message.Message{Type: message.Notify, ID: f.Mid, Route: f.Route, Data: f.Data}
	if f.Mid != 0 {
		m.Type = message.Request
		if l.c.draining.Load() {
			l.send(&clusterpb.Downstream{Kind: &clusterpb.Downstream_Response{Response: &clusterpb.Response{
				SessionId: rs.sess.ID(), Mid: f.Mid, Retry: true}}})
			return
		}
	}
	if err := l.c.n.disp.Dispatch(&rs.sess, &m); err != nil && f.Mid != 0 {
		_ = rs.sess.ResponseError(f.Mid, message.NewError(message.CodeUnavailable, "%v", err))
	}
}

// session returns the remote session for info, creating it on first sight
// and refreshing its uid and data from the gate.
func (l *link) session(info *clusterpb.Session) *remoteSession {
	l.mu.Lock()
	if l.sessions == nil {
		l.mu.Unlock()
		return nil
	}
	rs := l.sessions[info.Id]
	if rs == nil {
		rs = &remoteSession{link: l, addr: addr(info.RemoteAddr)}
		rs.sess.Init(info.Id, rs, l.c.n.opts.ser)
		l.sessions[info.Id] = rs
	}
	l.mu.Unlock()
	if info.Uid > 0 && rs.sess.UID() != info.Uid {
		rs.sess.SetUID(info.Uid)
	}
	if len(info.Data) > 0 {
		var data map[string]any
		if json.Unmarshal(info.Data, &data) == nil {
			rs.sess.SetData(data)
		}
	}
	return rs
}

func (l *link) get(sid int64) *remoteSession {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.sessions[sid]
}

// release ends the remote session sid: its client disconnected from the gate.
func (l *link) release(sid int64) {
	l.mu.Lock()
	rs := l.sessions[sid]
	delete(l.sessions, sid)
	l.mu.Unlock()
	if rs != nil {
		rs.sess.Release()
	}
}

func (l *link) send(d *clusterpb.Downstream) error {
	select {
	case l.sendq <- d:
		return nil
	case <-l.done:
		return errLinkClosed
	}
}

var errLinkClosed = errors.New("node: link to gate closed")

// remoteSession is a backend's view of a session held by a gate. Its entity
// methods travel back to the gate over the link.
type remoteSession struct {
	sess session.Session
	link *link
	addr net.Addr
}

func (rs *remoteSession) Push(route string, data []byte) error {
	return rs.link.send(&clusterpb.Downstream{Kind: &clusterpb.Downstream_Push{Push: &clusterpb.Push{
		SessionIds: []int64{rs.sess.ID()}, Route: route, Data: bytes.Clone(data)}}})
}

func (rs *remoteSession) Response(mid uint64, data []byte, isError bool) error {
	return rs.link.send(&clusterpb.Downstream{Kind: &clusterpb.Downstream_Response{Response: &clusterpb.Response{
		SessionId: rs.sess.ID(), Mid: mid, Data: bytes.Clone(data), Error: isError}}})
}

func (rs *remoteSession) Kick(reason string) error {
	return rs.link.send(&clusterpb.Downstream{Kind: &clusterpb.Downstream_Kick{Kick: &clusterpb.Kick{
		SessionId: rs.sess.ID(), Reason: reason}}})
}

func (rs *remoteSession) Close() error {
	return rs.link.send(&clusterpb.Downstream{Kind: &clusterpb.Downstream_Close{Close: &clusterpb.Close{SessionId: rs.sess.ID()}}})
}

func (rs *remoteSession) RemoteAddr() net.Addr { return rs.addr }

// Bind implements session.Binder: the gate learns the uid.
func (rs *remoteSession) Bind(sid, uid int64) error {
	return rs.link.send(&clusterpb.Downstream{Kind: &clusterpb.Downstream_Bind{Bind: &clusterpb.Bind{SessionId: sid, Uid: uid}}})
}

// BatchKey implements session.BatchPusher: one push per gate link.
func (rs *remoteSession) BatchKey() string { return rs.link.gate }

// PushBatch implements session.BatchPusher.
func (rs *remoteSession) PushBatch(ids []int64, route string, data []byte) error {
	return rs.link.send(&clusterpb.Downstream{Kind: &clusterpb.Downstream_Push{Push: &clusterpb.Push{
		SessionIds: ids, Route: route, Data: bytes.Clone(data)}}})
}

type addr string

func (a addr) Network() string { return "tcp" }
func (a addr) String() string  { return string(a) }

// Call implements clusterpb.ClusterServer: a server-to-server request or
// notify, run by the ordinary handler against a session with no client.
func (c *cluster) Call(ctx context.Context, req *clusterpb.CallRequest) (*clusterpb.CallResponse, error) {
	data, err := c.n.callLocal(ctx, req.Route, req.Data, req.Notify)
	if err != nil {
		var me *message.Error
		if errors.As(err, &me) {
			return &clusterpb.CallResponse{Code: int32(me.Code), Message: me.Message}, nil
		}
		if ctx.Err() != nil {
			return nil, status.Error(codes.DeadlineExceeded, err.Error())
		}
		return &clusterpb.CallResponse{Code: message.CodeInternal, Message: err.Error()}, nil
	}
	return &clusterpb.CallResponse{Data: data}, nil
}

// callEntity captures the response of a handler run for a server-to-server call.
type callEntity struct {
	ch  chan callResult
	ser message.Serializer
}

type callResult struct {
	data []byte
	err  error
}

func (e *callEntity) deliver(r callResult) {
	select {
	case e.ch <- r:
	default: // a second response: ignored
	}
}

func (e *callEntity) Push(string, []byte) error { return errNoClient }
func (e *callEntity) Response(_ uint64, data []byte, isError bool) error {
	if isError {
		me, err := message.UnmarshalError(e.ser, data)
		if err != nil {
			me = &message.Error{Code: message.CodeInternal, Message: string(data)}
		}
		e.deliver(callResult{err: me})
		return nil
	}
	e.deliver(callResult{data: bytes.Clone(data)})
	return nil
}
func (e *callEntity) Kick(string) error    { return errNoClient }
func (e *callEntity) Close() error         { return nil }
func (e *callEntity) RemoteAddr() net.Addr { return addr("") }

var errNoClient = fmt.Errorf("node: server-to-server call has no client")
