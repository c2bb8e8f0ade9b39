package message

import (
	"testing"
)

func skipAllocTest(t *testing.T) {
	if raceEnabled {
		t.Skip("allocation counts are not meaningful with -race")
	}
	if testing.Short() {
		t.Skip("short")
	}
}

var (
	reqPlain      = Message{Type: Request, ID: 300, Route: "room.join", Data: []byte(`{"room":"lobby"}`)}
	pushPlain     = Message{Type: Push, Route: "room.leave", Data: []byte(`{"text":"hi"}`)}
	respError     = Message{Type: Response, ID: 5, Error: true, Data: []byte(`{"code":404,"message":"not found"}`)}
	wirePlain     = hx("00 01 0a 72 6f 6f 6d 2e 6c 65 61 76 65 7b 7d")    // Request room.leave (known, plain)
	wireCompr     = hx("03 00 02 7b 22 74 65 78 74 22 3a 22 68 69 22 7d") // Notify chat.say (code 2)
	wireResponse  = hx("04 ac 02 7b 22 6f 6b 22 3a 74 72 75 65 7d")       // Response id 300
	wireUnknown   = hx("00 01 09 72 6f 6f 6d 2e 70 61 73 73 7b 7d")       // Request room.pass (unknown)
	wireZlib      = hx("14 01 " + zlibHelloWorld)                         // Response, zlib data
	wireKnownJoin = hx("00 01 09 72 6f 6f 6d 2e 6a 6f 69 6e 7b 7d")       // Request room.join sent plain
)

func TestAllocsAppend(t *testing.T) {
	skipAllocTest(t)
	buf := make([]byte, 0, 256)
	for _, m := range []*Message{&reqPlain, &pushPlain, &respError} {
		for _, dict := range []*Dictionary{nil, testDict} {
			allocs := testing.AllocsPerRun(1000, func() {
				var err error
				if buf, err = Append(buf[:0], m, dict); err != nil {
					t.Fatal(err)
				}
			})
			if allocs != 0 {
				t.Errorf("Append(%v, dict %t): %v allocs, want 0", m, dict != nil, allocs)
			}
		}
	}
}

func TestAllocsDecode(t *testing.T) {
	skipAllocTest(t)
	tests := []struct {
		name string
		wire []byte
	}{
		{"plain route known as uncompressed", wirePlain},
		{"plain route that has a code", wireKnownJoin},
		{"compressed route", wireCompr},
		{"response", wireResponse},
	}
	for _, tt := range tests {
		var m Message
		allocs := testing.AllocsPerRun(1000, func() {
			if err := Decode(tt.wire, &m, testDict, 1<<16); err != nil {
				t.Fatal(err)
			}
		})
		if allocs != 0 {
			t.Errorf("Decode %s: %v allocs, want 0", tt.name, allocs)
		}
	}
}

func BenchmarkAppend(b *testing.B) {
	benches := []struct {
		name string
		m    *Message
		dict *Dictionary
	}{
		{"request-plain", &reqPlain, nil},
		{"request-compressed", &reqPlain, testDict},
		{"push-plain", &pushPlain, testDict},
		{"error-response", &respError, testDict},
	}
	for _, bb := range benches {
		b.Run(bb.name, func(b *testing.B) {
			buf := make([]byte, 0, 256)
			b.ReportAllocs()
			for b.Loop() {
				buf, _ = Append(buf[:0], bb.m, bb.dict)
			}
		})
	}
}

func BenchmarkDecode(b *testing.B) {
	benches := []struct {
		name string
		wire []byte
	}{
		{"plain-known", wirePlain},
		{"compressed", wireCompr},
		{"response", wireResponse},
		{"plain-unknown", wireUnknown},
		{"zlib", wireZlib},
	}
	for _, bb := range benches {
		b.Run(bb.name, func(b *testing.B) {
			var m Message
			b.ReportAllocs()
			for b.Loop() {
				if err := Decode(bb.wire, &m, testDict, 1<<16); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
