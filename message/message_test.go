package message

import (
	"bytes"
	"encoding/hex"
	"errors"
	"math"
	"os"
	"strings"
	"testing"
)

// The byte vectors in this file are mirrored in docs/protocol.md, section
// "Byte-level examples". Keep the two in sync: change one, change the other.

// hx decodes a hex string in which spaces are ignored ("00 01 09 72 6f").
func hx(s string) []byte {
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		panic(err)
	}
	return b
}

// testDict is the route dictionary of the examples: room.join=1, chat.say=2,
// onChat=3, and room.leave known but not compressed.
var testDict = func() *Dictionary {
	d, err := NewDictionary(map[string]uint16{"room.join": 1, "chat.say": 2, "onChat": 3}, "room.leave")
	if err != nil {
		panic(err)
	}
	return d
}()

func equal(a, b *Message) bool {
	return a.Type == b.Type && a.ID == b.ID && a.Route == b.Route && a.Error == b.Error &&
		bytes.Equal(a.Data, b.Data)
}

// vectors encode and decode to each other exactly.
var vectors = []struct {
	name string
	dict *Dictionary // nil: no dictionary
	msg  Message
	wire string
}{
	{"request id=1 room.join {}", nil,
		Message{Type: Request, ID: 1, Route: "room.join", Data: []byte(`{}`)},
		"00 01 09 72 6f 6f 6d 2e 6a 6f 69 6e 7b 7d"},
	{"request id=1 room.join {}, compressed", testDict,
		Message{Type: Request, ID: 1, Route: "room.join", Data: []byte(`{}`)},
		"01 01 00 01 7b 7d"},
	{"request id=300, compressed", testDict,
		Message{Type: Request, ID: 300, Route: "room.join", Data: []byte(`{}`)},
		"01 ac 02 00 01 7b 7d"},
	{"request known but uncompressed route", testDict,
		Message{Type: Request, ID: 1, Route: "room.leave"},
		"00 01 0a 72 6f 6f 6d 2e 6c 65 61 76 65"},
	{"notify chat.say", nil,
		Message{Type: Notify, Route: "chat.say", Data: []byte(`{"text":"hi"}`)},
		"02 08 63 68 61 74 2e 73 61 79 7b 22 74 65 78 74 22 3a 22 68 69 22 7d"},
	{"notify chat.say, compressed", testDict,
		Message{Type: Notify, Route: "chat.say", Data: []byte(`{"text":"hi"}`)},
		"03 00 02 7b 22 74 65 78 74 22 3a 22 68 69 22 7d"},
	{"notify empty route, no data", nil, Message{Type: Notify}, "02 00"},
	{"response id=1", nil,
		Message{Type: Response, ID: 1, Data: []byte(`{"ok":true}`)},
		"04 01 7b 22 6f 6b 22 3a 74 72 75 65 7d"},
	{"error response id=5, 404", testDict,
		Message{Type: Response, ID: 5, Error: true, Data: []byte(`{"code":404,"message":"not found"}`)},
		"24 05 7b 22 63 6f 64 65 22 3a 34 30 34 2c 22 6d 65 73 73 61 67 65 22 3a 22 6e 6f 74 20 66 6f 75 6e 64 22 7d"},
	{"push onChat", nil,
		Message{Type: Push, Route: "onChat", Data: []byte(`{"text":"hi"}`)},
		"06 06 6f 6e 43 68 61 74 7b 22 74 65 78 74 22 3a 22 68 69 22 7d"},
	{"push onChat, compressed", testDict,
		Message{Type: Push, Route: "onChat", Data: []byte(`{"text":"hi"}`)},
		"07 00 03 7b 22 74 65 78 74 22 3a 22 68 69 22 7d"},
	{"id 0", nil, Message{Type: Response, ID: 0}, "04 00"},
	{"id 127", nil, Message{Type: Response, ID: 127}, "04 7f"},
	{"id 128", nil, Message{Type: Response, ID: 128}, "04 80 01"},
	{"id 300", nil, Message{Type: Response, ID: 300}, "04 ac 02"},
	{"id 2^32", nil, Message{Type: Response, ID: 1 << 32}, "04 80 80 80 80 10"},
	{"id 2^64-1", nil, Message{Type: Response, ID: math.MaxUint64}, "04 ff ff ff ff ff ff ff ff ff 01"},
	{"route of 255 bytes", nil,
		Message{Type: Notify, Route: strings.Repeat("r", 255)},
		"02 ff " + strings.Repeat("72", 255)},
}

func TestEncodeVectors(t *testing.T) {
	for _, v := range vectors {
		t.Run(v.name, func(t *testing.T) {
			want := hx(v.wire)
			got, err := Encode(&v.msg, v.dict)
			if err != nil || !bytes.Equal(got, want) {
				t.Fatalf("Encode = % x, %v\nwant % x", got, err, want)
			}
			got, err = Append([]byte("pre"), &v.msg, v.dict)
			if err != nil || !bytes.Equal(got, append([]byte("pre"), want...)) {
				t.Fatalf("Append = % x, %v", got, err)
			}
		})
	}
}

func TestDecodeVectors(t *testing.T) {
	for _, v := range vectors {
		t.Run(v.name, func(t *testing.T) {
			var m Message
			if err := Decode(hx(v.wire), &m, v.dict, 0); err != nil || !equal(&m, &v.msg) {
				t.Fatalf("Decode = %v, %v\nwant %v", &m, err, &v.msg)
			}
		})
	}
}

// zlib streams (RFC 1950) used by the examples.
const (
	zlibHelloWorld = "78 9c ab 56 ca 48 cd c9 c9 57 b2 52 2a cf 2f ca 49 51 aa 05 00 35 6b 05 f7" // {"hello":"world"}
	zlib100a       = "78 9c 4b 4c a4 3d 00 00 7a 47 25 e5"                                        // "a" x 100
)

func TestDecodeZlib(t *testing.T) {
	hello := []byte(`{"hello":"world"}`)
	tests := []struct {
		name    string
		wire    string
		maxData int
		want    Message
		err     error
	}{
		{"response, flag 0x14", "14 01 " + zlibHelloWorld, 0,
			Message{Type: Response, ID: 1, Data: hello}, nil},
		{"push compressed route, flag 0x17", "17 00 03 " + zlibHelloWorld, 0,
			Message{Type: Push, Route: "onChat", Data: hello}, nil},
		{"error response, flag 0x34", "34 02 " + zlibHelloWorld, 17,
			Message{Type: Response, ID: 2, Error: true, Data: hello}, nil},
		{"inflated 100 bytes, limit 100", "16 01 61 " + zlib100a, 100,
			Message{Type: Push, Route: "a", Data: bytes.Repeat([]byte("a"), 100)}, nil},
		{"inflated 100 bytes, limit 99", "16 01 61 " + zlib100a, 99, Message{}, ErrTooLarge},
		{"inflated 100 bytes from 12, limit 64", "16 01 61 " + zlib100a, 64, Message{}, ErrTooLarge},
		{"not zlib", "14 01 7b 7d", 0, Message{}, ErrInvalidMessage},
		{"empty zlib data", "14 01", 0, Message{}, ErrInvalidMessage},
		{"truncated zlib", "14 01 " + zlibHelloWorld[:30], 0, Message{}, ErrInvalidMessage},
		{"bad adler32", "14 01 " + zlibHelloWorld[:len(zlibHelloWorld)-2] + "f8", 0, Message{}, ErrInvalidMessage},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var m Message
			err := Decode(hx(tt.wire), &m, testDict, tt.maxData)
			if !errors.Is(err, tt.err) {
				t.Fatalf("err = %v, want %v", err, tt.err)
			}
			if err == nil && !equal(&m, &tt.want) {
				t.Fatalf("got %v\nwant %v", &m, &tt.want)
			}
		})
	}
}

func TestDecodeErrors(t *testing.T) {
	tests := []struct {
		name    string
		wire    string
		dict    *Dictionary
		maxData int
		err     error
	}{
		{"empty", "", testDict, 0, ErrInvalidMessage},
		{"flag bit 0x40", "44 01", testDict, 0, ErrInvalidMessage},
		{"flag bit 0x80", "84 01", testDict, 0, ErrInvalidMessage},
		{"type 4", "08 01", testDict, 0, ErrInvalidMessage},
		{"type 7", "0e 01", testDict, 0, ErrInvalidMessage},
		{"error flag on request", "20 01 01 61", testDict, 0, ErrInvalidMessage},
		{"error flag on notify", "22 01 61", testDict, 0, ErrInvalidMessage},
		{"error flag on push", "26 01 61", testDict, 0, ErrInvalidMessage},
		{"route flag on response", "05 01", testDict, 0, ErrInvalidMessage},
		{"request without id", "00", testDict, 0, ErrInvalidMessage},
		{"truncated varint", "04 80", testDict, 0, ErrInvalidMessage},
		{"varint over 64 bits", "04 ff ff ff ff ff ff ff ff ff 02", testDict, 0, ErrInvalidMessage},
		{"varint over 10 bytes", "04 80 80 80 80 80 80 80 80 80 80 00", testDict, 0, ErrInvalidMessage},
		{"request without route", "00 01", testDict, 0, ErrInvalidMessage},
		{"notify without route", "02", testDict, 0, ErrInvalidMessage},
		{"short route", "00 01 05 61 62", testDict, 0, ErrInvalidMessage},
		{"short route code", "01 01 00", testDict, 0, ErrInvalidMessage},
		{"no route code", "03", testDict, 0, ErrInvalidMessage},
		{"unknown route code", "01 01 00 63", testDict, 0, ErrUnknownCode},
		{"route code without dictionary", "03 00 01", nil, 0, ErrUnknownCode},
		{"data over limit", "04 01 7b 22 6f 6b 22 3a 74 72 75 65 7d", testDict, 10, ErrTooLarge},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var m Message
			if err := Decode(hx(tt.wire), &m, tt.dict, tt.maxData); !errors.Is(err, tt.err) {
				t.Fatalf("err = %v, want %v", err, tt.err)
			}
		})
	}
	// At the limit is fine.
	var m Message
	if err := Decode(hx("04 01 7b 22 6f 6b 22 3a 74 72 75 65 7d"), &m, nil, 11); err != nil {
		t.Fatalf("data at limit: %v", err)
	}
}

func TestDecodeResetsMessage(t *testing.T) {
	m := Message{Type: Push, ID: 9, Route: "x", Data: []byte("y"), Error: true}
	if err := Decode(hx("02 00"), &m, nil, 0); err != nil || !equal(&m, &Message{Type: Notify}) {
		t.Fatalf("Decode = %v, %v", &m, err)
	}
}

func TestDecodeDataAliasesInput(t *testing.T) {
	b := hx("04 01 7b 7d")
	var m Message
	if err := Decode(b, &m, nil, 0); err != nil {
		t.Fatal(err)
	}
	b[2] = 'x'
	if string(m.Data) != "x}" {
		t.Fatalf("Data = %q does not alias the input", m.Data)
	}
}

func TestEncodeErrors(t *testing.T) {
	long := strings.Repeat("r", 256)
	tests := []struct {
		name string
		msg  Message
		err  error
	}{
		{"type 4", Message{Type: 4}, ErrInvalidMessage},
		{"type 255", Message{Type: 255}, ErrInvalidMessage},
		{"request route of 256 bytes", Message{Type: Request, ID: 1, Route: long}, ErrRouteTooLong},
		{"notify route of 256 bytes", Message{Type: Notify, Route: long}, ErrRouteTooLong},
		{"push route of 256 bytes", Message{Type: Push, Route: long}, ErrRouteTooLong},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dst := []byte("pre")
			got, err := Append(dst, &tt.msg, testDict)
			if !errors.Is(err, tt.err) || string(got) != "pre" {
				t.Fatalf("Append = %q, %v; want dst unchanged, %v", got, err, tt.err)
			}
		})
	}
	// A route too long to send plain is no problem on a Response, which has no route.
	if _, err := Encode(&Message{Type: Response, ID: 1, Route: long}, nil); err != nil {
		t.Fatalf("response: %v", err)
	}
}

func TestEncodeIgnoresFieldsOfOtherTypes(t *testing.T) {
	tests := []struct {
		msg  Message
		wire string
	}{
		{Message{Type: Notify, ID: 7, Route: "a"}, "02 01 61"},                  // notify has no id
		{Message{Type: Push, ID: 7, Route: "a", Error: true}, "06 01 61"},       // nor push, no error flag
		{Message{Type: Response, ID: 7, Route: "room.join"}, "04 07"},           // response has no route
		{Message{Type: Request, ID: 7, Route: "a", Error: true}, "00 07 01 61"}, // error only on responses
	}
	for _, tt := range tests {
		got, err := Encode(&tt.msg, testDict)
		if err != nil || !bytes.Equal(got, hx(tt.wire)) {
			t.Errorf("Encode(%v) = % x, %v; want %s", &tt.msg, got, err, tt.wire)
		}
	}
}

func TestTypeString(t *testing.T) {
	for typ, want := range map[Type]string{
		Request: "Request", Notify: "Notify", Response: "Response", Push: "Push", 9: "Type(9)",
	} {
		if got := typ.String(); got != want {
			t.Errorf("String() = %q, want %q", got, want)
		}
	}
	m := Message{Type: Request, ID: 1, Route: "a.b", Data: []byte("{}")}
	if got, want := m.String(), `Request id=1 route="a.b" error=false data="{}"`; got != want {
		t.Errorf("Message.String() = %q, want %q", got, want)
	}
}

// TestInflaterReuse interleaves good and bad zlib data so that pooled zlib
// readers are reused after every kind of failure.
func TestInflaterReuse(t *testing.T) {
	good := hx("14 01 " + zlibHelloWorld)
	bad := []string{
		"14 01 7b 7d",                      // bad header
		"14 01 " + zlibHelloWorld[:30],     // truncated
		"16 01 61 " + zlib100a,             // over the limit below
		"14 01 78 9c ab 56 ca 48 ff ff ff", // corrupt deflate data
	}
	for i := range 50 {
		var m Message
		if err := Decode(hx(bad[i%len(bad)]), &m, testDict, 64); err == nil {
			t.Fatalf("bad vector %d accepted", i%len(bad))
		}
		if err := Decode(good, &m, testDict, 64); err != nil || string(m.Data) != `{"hello":"world"}` {
			t.Fatalf("after bad vector %d: %v, %v", i%len(bad), &m, err)
		}
	}
}

// TestDocMirrorsVectors checks that docs/protocol.md shows the vectors of this
// package, apart from the few that only exercise edge cases.
func TestDocMirrorsVectors(t *testing.T) {
	doc, err := os.ReadFile("../docs/protocol.md")
	if err != nil {
		t.Skipf("no protocol document: %v", err)
	}
	norm := func(s string) string {
		return strings.Join(strings.Fields(strings.ToLower(strings.ReplaceAll(s, "`", " "))), " ")
	}
	text := norm(string(doc))
	notShown := map[string]bool{"request known but uncompressed route": true, "route of 255 bytes": true}
	wires := []string{"14 01 " + zlibHelloWorld, "17 00 03 " + zlibHelloWorld, "34 02 " + zlibHelloWorld, "16 01 61 " + zlib100a}
	for _, v := range vectors {
		if !notShown[v.name] {
			wires = append(wires, v.wire)
		}
	}
	for _, w := range wires {
		if !strings.Contains(text, norm(w)) {
			t.Errorf("docs/protocol.md lacks vector %s", w)
		}
	}
}
