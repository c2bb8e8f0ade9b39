package baseline

import (
	"context"
	"encoding/binary"
	"errors"
	"net"

	"github.com/nanomesh/nanomesh/message"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// The baseline cluster forwards every message with one unary gRPC call, as
// pitaya does. Request: session id (8 bytes) | route length (1) | route |
// data. Response: error flag (1) | data.

const callMethod = "/nanomeshbench.Baseline/Call"

type callServer interface {
	call(ctx context.Context, in *wrapperspb.BytesValue) (*wrapperspb.BytesValue, error)
}

var serviceDesc = grpc.ServiceDesc{
	ServiceName: "nanomeshbench.Baseline",
	HandlerType: (*callServer)(nil),
	Methods: []grpc.MethodDesc{{
		MethodName: "Call",
		Handler: func(srv any, ctx context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
			in := new(wrapperspb.BytesValue)
			if err := dec(in); err != nil {
				return nil, err
			}
			return srv.(callServer).call(ctx, in)
		},
	}},
	Metadata: "bench",
}

// Backend serves handlers to baseline gates over gRPC.
type Backend struct {
	handlers map[string]Handler
	srv      *grpc.Server
	ln       net.Listener
}

// ServeBackend serves handlers on addr and returns the bound address.
func ServeBackend(addr string, handlers map[string]Handler) (*Backend, string, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, "", err
	}
	b := &Backend{handlers: handlers, srv: grpc.NewServer(), ln: ln}
	b.srv.RegisterService(&serviceDesc, b)
	go func() { _ = b.srv.Serve(ln) }()
	return b, ln.Addr().String(), nil
}

// Close stops the backend.
func (b *Backend) Close() { b.srv.Stop() }

func (b *Backend) call(_ context.Context, in *wrapperspb.BytesValue) (*wrapperspb.BytesValue, error) {
	v := in.Value
	if len(v) < 9 || len(v) < 9+int(v[8]) {
		return nil, errors.New("short request")
	}
	route := string(v[9 : 9+int(v[8])])
	data := v[9+int(v[8]):]
	h := b.handlers[route]
	var resp []byte
	var me *message.Error
	if h == nil {
		me = message.NewError(message.CodeNotFound, "route %q not found", route)
	} else {
		resp, me = h(nil, data)
	}
	if me != nil {
		return &wrapperspb.BytesValue{Value: append([]byte{1}, message.MarshalError(message.JSON, me)...)}, nil
	}
	return &wrapperspb.BytesValue{Value: append([]byte{0}, resp...)}, nil
}

// DialBackend returns a Remote that forwards to the backend at addr over one
// gRPC connection.
func DialBackend(addr string) (Remote, func(), error) {
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, nil, err
	}
	remote := func(ctx context.Context, s *Session, route string, data []byte) ([]byte, *message.Error) {
		req := make([]byte, 9, 9+len(route)+len(data))
		binary.BigEndian.PutUint64(req, uint64(s.ID()))
		req[8] = byte(len(route))
		req = append(append(req, route...), data...)
		out := new(wrapperspb.BytesValue)
		if err := cc.Invoke(ctx, callMethod, &wrapperspb.BytesValue{Value: req}, out); err != nil {
			return nil, message.NewError(message.CodeBadGateway, "%v", err)
		}
		if len(out.Value) == 0 {
			return nil, message.NewError(message.CodeBadGateway, "empty response")
		}
		if out.Value[0] == 1 {
			var me message.Error
			if err := message.JSON.Unmarshal(out.Value[1:], &me); err != nil {
				return nil, message.NewError(message.CodeBadGateway, "%v", err)
			}
			return nil, &me
		}
		return out.Value[1:], nil
	}
	return remote, func() { cc.Close() }, nil
}
