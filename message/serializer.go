package message

import (
	"encoding/json"
	"errors"
	"fmt"

	"google.golang.org/protobuf/proto"
)

// Serializer converts handler arguments and replies to and from payloads.
// Both built-in serializers pass []byte through untouched: a []byte value is
// sent as is, and decoding into *[]byte copies the payload.
type Serializer interface {
	// Name is the serializer's name as announced in the handshake ("json", "protobuf").
	Name() string
	Marshal(v any) ([]byte, error)
	Unmarshal(data []byte, v any) error
}

// ErrNotProto is returned by the protobuf serializer for a value that is not a proto.Message.
var ErrNotProto = errors.New("message: value is not a proto.Message")

// JSON is the default serializer, encoding/json.
var JSON Serializer = jsonSerializer{}

// Protobuf serializes proto.Message values with google.golang.org/protobuf.
var Protobuf Serializer = protoSerializer{}

type jsonSerializer struct{}

func (jsonSerializer) Name() string { return "json" }

func (jsonSerializer) Marshal(v any) ([]byte, error) {
	if b, ok := raw(v); ok {
		return b, nil
	}
	return json.Marshal(v)
}

func (jsonSerializer) Unmarshal(data []byte, v any) error {
	if p, ok := v.(*[]byte); ok {
		*p = append((*p)[:0], data...)
		return nil
	}
	return json.Unmarshal(data, v)
}

type protoSerializer struct{}

func (protoSerializer) Name() string { return "protobuf" }

func (protoSerializer) Marshal(v any) ([]byte, error) {
	if b, ok := raw(v); ok {
		return b, nil
	}
	pm, ok := v.(proto.Message)
	if !ok {
		return nil, fmt.Errorf("%w: %T", ErrNotProto, v)
	}
	return proto.Marshal(pm)
}

func (protoSerializer) Unmarshal(data []byte, v any) error {
	if p, ok := v.(*[]byte); ok {
		*p = append((*p)[:0], data...)
		return nil
	}
	pm, ok := v.(proto.Message)
	if !ok {
		return fmt.Errorf("%w: %T", ErrNotProto, v)
	}
	return proto.Unmarshal(data, pm)
}

func raw(v any) ([]byte, bool) {
	switch b := v.(type) {
	case []byte:
		return b, true
	case json.RawMessage:
		return b, true
	}
	return nil, false
}
