package message

import (
	"encoding/json"
	"fmt"

	"google.golang.org/protobuf/encoding/protowire"
)

// Error codes carried by error responses.
const (
	CodeBadRequest   = 400 // the request body could not be decoded
	CodeNotFound     = 404 // no handler serves the route
	CodeInternal     = 500 // the handler failed or panicked
	CodeBadGateway   = 502 // the node serving the route is unreachable
	CodeUnavailable  = 503 // the node is shutting down
	CodeTimeout      = 504 // the remote node did not answer in time
	CodeUnauthorized = 401 // a handshake validator refused the client
)

// Error is a coded error. Returned by a handler it becomes an error response
// (flag 0x20) with body {"code":..,"message":..}; any other error a handler
// returns becomes code 500.
type Error struct {
	Code    int    `json:"code"`
	Message string `json:"message"`
}

// NewError returns an *Error with the given code and formatted message.
func NewError(code int, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}

// Error implements error.
func (e *Error) Error() string { return fmt.Sprintf("code %d: %s", e.Code, e.Message) }

// MarshalError encodes e with ser: JSON {"code":..,"message":..} for every
// serializer but protobuf, which gets the equivalent message
// {int32 code = 1; string message = 2;}.
func MarshalError(ser Serializer, e *Error) []byte {
	if ser != nil && ser.Name() == "protobuf" {
		b := protowire.AppendTag(nil, 1, protowire.VarintType)
		b = protowire.AppendVarint(b, uint64(int64(e.Code)))
		b = protowire.AppendTag(b, 2, protowire.BytesType)
		return protowire.AppendString(b, e.Message)
	}
	b, _ := json.Marshal(e)
	return b
}

// UnmarshalError decodes an error body encoded by MarshalError.
func UnmarshalError(ser Serializer, data []byte) (*Error, error) {
	e := &Error{}
	if ser != nil && ser.Name() == "protobuf" {
		for len(data) > 0 {
			num, typ, n := protowire.ConsumeTag(data)
			if n < 0 {
				return nil, fmt.Errorf("%w: error body", ErrInvalidMessage)
			}
			data = data[n:]
			switch {
			case num == 1 && typ == protowire.VarintType:
				v, n := protowire.ConsumeVarint(data)
				if n < 0 {
					return nil, fmt.Errorf("%w: error code", ErrInvalidMessage)
				}
				e.Code, data = int(int64(v)), data[n:]
			case num == 2 && typ == protowire.BytesType:
				v, n := protowire.ConsumeString(data)
				if n < 0 {
					return nil, fmt.Errorf("%w: error message", ErrInvalidMessage)
				}
				e.Message, data = v, data[n:]
			default:
				n := protowire.ConsumeFieldValue(num, typ, data)
				if n < 0 {
					return nil, fmt.Errorf("%w: error body", ErrInvalidMessage)
				}
				data = data[n:]
			}
		}
		return e, nil
	}
	if err := json.Unmarshal(data, e); err != nil {
		return nil, fmt.Errorf("%w: error body: %v", ErrInvalidMessage, err)
	}
	return e, nil
}
