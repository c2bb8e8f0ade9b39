package message

import (
	"encoding/json"
	"errors"
	"testing"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

func TestSerializerNames(t *testing.T) {
	if JSON.Name() != "json" || Protobuf.Name() != "protobuf" {
		t.Fatalf("names %q, %q", JSON.Name(), Protobuf.Name())
	}
}

func TestSerializerRawBytes(t *testing.T) {
	for _, ser := range []Serializer{JSON, Protobuf} {
		t.Run(ser.Name(), func(t *testing.T) {
			in := []byte("\x00raw")
			for _, v := range []any{in, json.RawMessage(in)} {
				out, err := ser.Marshal(v)
				if err != nil || &out[0] != &in[0] {
					t.Fatalf("Marshal(%T) = %q, %v; want the same bytes", v, out, err)
				}
			}
			var got []byte
			if err := ser.Unmarshal(in, &got); err != nil || string(got) != "\x00raw" {
				t.Fatalf("Unmarshal = %q, %v", got, err)
			}
			in[0] = 'X'
			if got[0] != 0 {
				t.Fatal("Unmarshal into *[]byte does not copy")
			}
		})
	}
}

func TestJSONSerializer(t *testing.T) {
	type msg struct {
		Text string `json:"text"`
	}
	b, err := JSON.Marshal(&msg{"hi"})
	if err != nil || string(b) != `{"text":"hi"}` {
		t.Fatalf("Marshal = %s, %v", b, err)
	}
	var m msg
	if err := JSON.Unmarshal(b, &m); err != nil || m.Text != "hi" {
		t.Fatalf("Unmarshal = %+v, %v", m, err)
	}
	if err := JSON.Unmarshal([]byte("{"), &m); err == nil {
		t.Fatal("Unmarshal accepted bad JSON")
	}
}

func TestProtobufSerializer(t *testing.T) {
	b, err := Protobuf.Marshal(wrapperspb.String("hi"))
	if err != nil || string(b) != "\x0a\x02hi" {
		t.Fatalf("Marshal = % x, %v", b, err)
	}
	var got wrapperspb.StringValue
	if err := Protobuf.Unmarshal(b, &got); err != nil || !proto.Equal(&got, wrapperspb.String("hi")) {
		t.Fatalf("Unmarshal = %v, %v", &got, err)
	}
	if _, err := Protobuf.Marshal(struct{}{}); !errors.Is(err, ErrNotProto) {
		t.Fatalf("Marshal(struct) err = %v", err)
	}
	if err := Protobuf.Unmarshal(b, &struct{}{}); !errors.Is(err, ErrNotProto) {
		t.Fatalf("Unmarshal(struct) err = %v", err)
	}
}

// TestErrorBodies checks the error-body vectors mirrored in docs/protocol.md.
func TestErrorBodies(t *testing.T) {
	e := NewError(CodeNotFound, "%s", "not found")
	if e.Error() != "code 404: not found" {
		t.Fatalf("Error() = %q", e.Error())
	}
	tests := []struct {
		ser  Serializer
		wire string
	}{
		{JSON, "7b 22 63 6f 64 65 22 3a 34 30 34 2c 22 6d 65 73 73 61 67 65 22 3a 22 6e 6f 74 20 66 6f 75 6e 64 22 7d"},
		{nil, "7b 22 63 6f 64 65 22 3a 34 30 34 2c 22 6d 65 73 73 61 67 65 22 3a 22 6e 6f 74 20 66 6f 75 6e 64 22 7d"},
		{Protobuf, "08 94 03 12 09 6e 6f 74 20 66 6f 75 6e 64"}, // code=404 (field 1), message (field 2)
	}
	for _, tt := range tests {
		b := MarshalError(tt.ser, e)
		if string(b) != string(hx(tt.wire)) {
			t.Errorf("MarshalError(%v) = % x, want %s", tt.ser, b, tt.wire)
		}
		got, err := UnmarshalError(tt.ser, b)
		if err != nil || *got != *e {
			t.Errorf("UnmarshalError(%v) = %+v, %v", tt.ser, got, err)
		}
	}
	// protobuf: unknown fields are skipped, truncation is an error.
	got, err := UnmarshalError(Protobuf, hx("18 01 08 f4 03 12 02 6f 6b"))
	if err != nil || *got != (Error{Code: 500, Message: "ok"}) {
		t.Errorf("with unknown field: %+v, %v", got, err)
	}
	for _, bad := range []string{"08", "12 05 6f", "ff"} {
		if _, err := UnmarshalError(Protobuf, hx(bad)); !errors.Is(err, ErrInvalidMessage) {
			t.Errorf("UnmarshalError(protobuf, %s) err = %v", bad, err)
		}
	}
	if _, err := UnmarshalError(JSON, []byte("{")); !errors.Is(err, ErrInvalidMessage) {
		t.Errorf("UnmarshalError(JSON, bad) err = %v", err)
	}
}
