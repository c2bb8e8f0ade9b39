package client

import (
	"encoding/json"
	"errors"
	"fmt"
	"strconv"

	"google.golang.org/protobuf/encoding/protowire"
)

// Errors reported by a Client and a Conn. Callers branch on them with errors.Is.
var (
	// ErrClosed is wrapped by every error caused by the end of the
	// connection: a local Close, end of stream, a protocol error or a kick.
	ErrClosed = errors.New("client: connection closed")
	// ErrKicked is wrapped, together with ErrClosed, by the errors of a
	// client that the server kicked. Client.Kicked returns the reason.
	ErrKicked = errors.New("kicked by server")
	// ErrProtocol is wrapped by errors about data from the server that
	// violates the protocol (packet, message or WebSocket layer).
	ErrProtocol = errors.New("protocol error")
)

// Error is an error reported by the server: a rejected handshake
// ({"code":4xx,"message":"..."}) or a Response with the error flag, whose body
// is {"code":..,"message":".."}.
type Error struct {
	// Code is the error code, such as 400, 404, 500, 502, 503 or 504, or a
	// code chosen by the handler.
	Code int `json:"code"`
	// Message is the human-readable description sent by the server.
	Message string `json:"message"`
}

// Error returns the code and the message.
func (e *Error) Error() string {
	if e.Message == "" {
		return fmt.Sprintf("server error %d", e.Code)
	}
	return fmt.Sprintf("server error %d: %s", e.Code, e.Message)
}

// CloseError reports a WebSocket close frame received from the server.
type CloseError struct {
	// Code is the close status code (RFC 6455 section 7.4), or 1005 if the
	// frame carried none.
	Code int
	// Reason is the close reason the server sent, possibly empty.
	Reason string
}

// Error returns the close code and reason.
func (e *CloseError) Error() string {
	return fmt.Sprintf("websocket closed by server: %d %s", e.Code, e.Reason)
}

// decodeError decodes the body of an error Response. The protocol's body is
// {"code":..,"message":".."} in the session's serializer: JSON is tried first,
// then a protobuf message with the code in field 1 (an integer, or a string
// holding one as pitaya sends it) and the message in field 2. A body that is
// neither is returned whole as the message, with code 0.
func decodeError(data []byte) *Error {
	var e Error
	if json.Unmarshal(data, &e) == nil && (e.Code != 0 || e.Message != "") {
		return &e
	}
	if e, ok := decodeProtoError(data); ok {
		return e
	}
	return &Error{Message: string(data)}
}

func decodeProtoError(b []byte) (*Error, bool) {
	var e Error
	seen := false
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return nil, false
		}
		b = b[n:]
		switch {
		case num == 1 && typ == protowire.VarintType:
			v, n := protowire.ConsumeVarint(b)
			if n < 0 {
				return nil, false
			}
			e.Code, seen, b = int(int64(v)), true, b[n:]
			continue
		case (num == 1 || num == 2) && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return nil, false
			}
			b = b[n:]
			if num == 2 {
				e.Message, seen = string(v), true
			} else if code, err := strconv.Atoi(string(v)); err == nil {
				e.Code, seen = code, true
			} else {
				e.Message, seen = string(v), true
			}
			continue
		}
		n = protowire.ConsumeFieldValue(num, typ, b)
		if n < 0 {
			return nil, false
		}
		b = b[n:]
	}
	return &e, seen
}
