package message

import (
	"errors"
	"strings"
	"testing"
	"unsafe"
)

func TestNewDictionaryErrors(t *testing.T) {
	long := strings.Repeat("r", 256)
	tests := []struct {
		name  string
		codes map[string]uint16
		known []string
		err   error // nil: any non-nil error
	}{
		{"duplicate code", map[string]uint16{"a.b": 1, "c.d": 1}, nil, nil},
		{"compressed route over 255 bytes", map[string]uint16{long: 1}, nil, ErrRouteTooLong},
		{"known route over 255 bytes", nil, []string{"ok", long}, ErrRouteTooLong},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d, err := NewDictionary(tt.codes, tt.known...)
			if d != nil || err == nil || (tt.err != nil && !errors.Is(err, tt.err)) {
				t.Fatalf("NewDictionary = %v, %v; want nil, %v", d, err, tt.err)
			}
		})
	}
	if _, err := NewDictionary(map[string]uint16{strings.Repeat("r", 255): 1}); err != nil {
		t.Fatalf("route of 255 bytes: %v", err)
	}
}

func TestDictionaryLookups(t *testing.T) {
	d := testDict
	if d.Len() != 3 {
		t.Fatalf("Len() = %d", d.Len())
	}
	for route, code := range map[string]uint16{"room.join": 1, "chat.say": 2, "onChat": 3} {
		if c, ok := d.Code(route); !ok || c != code {
			t.Errorf("Code(%q) = %d, %t", route, c, ok)
		}
		if r, ok := d.Route(code); !ok || r != route {
			t.Errorf("Route(%d) = %q, %t", code, r, ok)
		}
	}
	if _, ok := d.Code("room.leave"); ok {
		t.Error("a known, uncompressed route has a code")
	}
	if _, ok := d.Route(0); ok {
		t.Error("code 0 is not in the dictionary")
	}
	codes := d.Codes()
	codes["room.join"] = 99
	if c, _ := d.Code("room.join"); c != 1 {
		t.Error("Codes() does not return a copy")
	}
}

func TestNilDictionary(t *testing.T) {
	var d *Dictionary
	if _, ok := d.Code("a"); ok {
		t.Error("Code")
	}
	if _, ok := d.Route(1); ok {
		t.Error("Route")
	}
	if d.Codes() != nil || d.Len() != 0 {
		t.Error("Codes/Len")
	}
	if d.intern([]byte("a.b")) != "a.b" {
		t.Error("intern")
	}
	empty, err := NewDictionary(nil)
	if err != nil || empty.Len() != 0 || len(empty.Codes()) != 0 {
		t.Fatalf("empty dictionary: %v, %v", empty, err)
	}
}

func TestDecodeInternsKnownRoutes(t *testing.T) {
	for _, route := range []string{"room.join", "room.leave"} {
		var m Message
		wire, _ := Encode(&Message{Type: Notify, Route: route}, nil) // plain route
		if err := Decode(wire, &m, testDict, 0); err != nil {
			t.Fatal(err)
		}
		if unsafe.StringData(m.Route) != unsafe.StringData(testDict.names[route]) {
			t.Errorf("%q: decoded route is not the dictionary's string", route)
		}
	}
}
