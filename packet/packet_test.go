package packet

import (
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
)

// The byte vectors in this file are mirrored in docs/protocol.md, section
// "Byte-level examples". Keep the two in sync: change one, change the other.

// hx decodes a hex string in which spaces are ignored ("01 00 00 02 7b 7d").
func hx(s string) []byte {
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		panic(err)
	}
	return b
}

// vectors are valid packets: the type, the body and their exact encoding.
var vectors = []struct {
	name string
	t    Type
	body string // literal body
	wire string // hex
}{
	{"client handshake {}", Handshake, `{}`, "01 00 00 02 7b 7d"},
	{"client handshake empty", Handshake, ``, "01 00 00 00"},
	{"server handshake reply", Handshake,
		`{"code":200,"sys":{"heartbeat":30,"servertime":1700000000,"serializer":"json","dict":{"room.join":1}}}`,
		"01 00 00 66 " +
			"7b 22 63 6f 64 65 22 3a 32 30 30 2c 22 73 79 73 22 3a 7b 22 68 65 61 72 74 62 65 61 74 22 3a 33 30 2c " +
			"22 73 65 72 76 65 72 74 69 6d 65 22 3a 31 37 30 30 30 30 30 30 30 30 2c 22 73 65 72 69 61 6c 69 7a 65 " +
			"72 22 3a 22 6a 73 6f 6e 22 2c 22 64 69 63 74 22 3a 7b 22 72 6f 6f 6d 2e 6a 6f 69 6e 22 3a 31 7d 7d 7d"},
	{"handshake refused", Handshake, `{"code":401,"message":"bad token"}`,
		"01 00 00 22 7b 22 63 6f 64 65 22 3a 34 30 31 2c 22 6d 65 73 73 61 67 65 22 3a 22 62 61 64 20 74 6f 6b 65 6e 22 7d"},
	{"handshake ack", HandshakeAck, ``, "02 00 00 00"},
	{"heartbeat", Heartbeat, ``, "03 00 00 00"},
	{"data: request id=1 room.join {}", Data, "\x00\x01\x09room.join{}",
		"04 00 00 0e 00 01 09 72 6f 6f 6d 2e 6a 6f 69 6e 7b 7d"},
	{"data: notify, compressed route 2", Data, "\x03\x00\x02{\"text\":\"hi\"}",
		"04 00 00 10 03 00 02 7b 22 74 65 78 74 22 3a 22 68 69 22 7d"},
	{"kick shutdown", Kick, `{"reason":"shutdown"}`,
		"05 00 00 15 7b 22 72 65 61 73 6f 6e 22 3a 22 73 68 75 74 64 6f 77 6e 22 7d"},
	{"data: 256-byte body", Data, strings.Repeat("x", 256), "04 00 01 00 " + strings.Repeat("78", 256)},
}

type pkt struct {
	t    Type
	body string
}

func (p pkt) String() string { return fmt.Sprintf("%s %q", p.t, p.body) }

// collect returns a handler that appends copies of the packets it sees to *out.
func collect(out *[]pkt) Handler {
	return func(t Type, body []byte) error {
		*out = append(*out, pkt{t, string(body)})
		return nil
	}
}

func TestEncodeVectors(t *testing.T) {
	for _, v := range vectors {
		t.Run(v.name, func(t *testing.T) {
			want := hx(v.wire)
			got, err := Encode(v.t, []byte(v.body))
			if err != nil || !bytes.Equal(got, want) {
				t.Fatalf("Encode = % x, %v; want % x", got, err, want)
			}
			prefix := []byte("prefix")
			got, err = Append(prefix, v.t, []byte(v.body))
			if err != nil || !bytes.Equal(got, append([]byte("prefix"), want...)) {
				t.Fatalf("Append = % x, %v", got, err)
			}
			hdr := make([]byte, HeaderLen)
			PutHeader(hdr, v.t, len(v.body))
			if !bytes.Equal(hdr, want[:HeaderLen]) {
				t.Fatalf("PutHeader = % x, want % x", hdr, want[:HeaderLen])
			}
		})
	}
}

func TestDecodeVectors(t *testing.T) {
	for _, v := range vectors {
		t.Run(v.name, func(t *testing.T) {
			var got []pkt
			d := NewDecoder(0)
			if err := d.Feed(hx(v.wire), collect(&got)); err != nil {
				t.Fatal(err)
			}
			want := []pkt{{v.t, v.body}}
			if fmt.Sprint(got) != fmt.Sprint(want) || d.Buffered() != 0 {
				t.Fatalf("got %v (buffered %d), want %v", got, d.Buffered(), want)
			}
		})
	}
}

func TestEncodeErrors(t *testing.T) {
	tests := []struct {
		name string
		t    Type
		n    int
		want error
	}{
		{"type 0", 0x00, 0, ErrWrongType},
		{"type 6", 0x06, 0, ErrWrongType},
		{"type 0xff", 0xff, 0, ErrWrongType},
		{"body over 2^24-1", Data, MaxBodyLen + 1, ErrTooLarge},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dst := []byte{9}
			got, err := Append(dst, tt.t, make([]byte, tt.n))
			if !errors.Is(err, tt.want) || !bytes.Equal(got, dst) {
				t.Fatalf("Append = % x, %v; want dst unchanged, %v", got, err, tt.want)
			}
			if _, err := Encode(tt.t, make([]byte, tt.n)); !errors.Is(err, tt.want) {
				t.Fatalf("Encode err = %v, want %v", err, tt.want)
			}
		})
	}
	// The largest body the length field can carry is accepted.
	b, err := Encode(Data, make([]byte, MaxBodyLen))
	if err != nil || !bytes.Equal(b[:HeaderLen], hx("04 ff ff ff")) {
		t.Fatalf("Encode(MaxBodyLen) = % x, %v", b[:HeaderLen], err)
	}
}

func TestTypeString(t *testing.T) {
	for typ, want := range map[Type]string{
		Handshake: "Handshake", HandshakeAck: "HandshakeAck", Heartbeat: "Heartbeat",
		Data: "Data", Kick: "Kick", 0: "Type(0x00)", 0x42: "Type(0x42)",
	} {
		if got := typ.String(); got != want {
			t.Errorf("%d.String() = %q, want %q", byte(typ), got, want)
		}
		if got, want := typ.Valid(), !strings.HasPrefix(want, "Type("); got != want {
			t.Errorf("%s.Valid() = %t", typ, got)
		}
	}
}

// stream is every valid vector back to back.
func stream() ([]byte, []pkt) {
	var b []byte
	var want []pkt
	for _, v := range vectors {
		b = append(b, hx(v.wire)...)
		want = append(want, pkt{v.t, v.body})
	}
	return b, want
}

// feedChunks feeds b to a new decoder split before each offset in cuts.
func feedChunks(t *testing.T, d *Decoder, b []byte, cuts ...int) ([]pkt, error) {
	t.Helper()
	var got []pkt
	prev := 0
	for _, c := range append(cuts, len(b)) {
		if err := d.Feed(b[prev:c], collect(&got)); err != nil {
			return got, err
		}
		prev = c
	}
	return got, nil
}

func TestDecoderChunking(t *testing.T) {
	b, want := stream()
	check := func(t *testing.T, name string, cuts ...int) {
		t.Helper()
		d := NewDecoder(0)
		got, err := feedChunks(t, d, b, cuts...)
		if err != nil || fmt.Sprint(got) != fmt.Sprint(want) || d.Buffered() != 0 {
			t.Fatalf("%s %v: got %v, err %v, buffered %d", name, cuts, got, err, d.Buffered())
		}
	}
	check(t, "all at once")
	for i := 0; i <= len(b); i++ {
		check(t, "split at", i)
	}
	// Every pair of split points over a shorter prefix of the stream keeps
	// the run short while covering header/header, header/body and
	// body/body splits in the same packet and across packets.
	for i := 0; i <= 80; i++ {
		for j := i; j <= 80; j++ {
			check(t, "split at", i, j)
		}
	}
	var every []int
	for i := 1; i < len(b); i++ {
		every = append(every, i)
	}
	check(t, "byte at a time", every...)
}

func TestDecoderBufferedMidPacket(t *testing.T) {
	b := hx("04 00 00 0e 00 01 09 72 6f 6f 6d 2e 6a 6f 69 6e 7b 7d")
	d := NewDecoder(0)
	for i := range len(b) - 1 {
		var got []pkt
		if err := d.Feed(b[i:i+1], collect(&got)); err != nil || len(got) != 0 {
			t.Fatalf("byte %d: %v, %v", i, got, err)
		}
		if d.Buffered() != i+1 {
			t.Fatalf("after %d bytes Buffered() = %d", i+1, d.Buffered())
		}
	}
	var got []pkt
	if err := d.Feed(b[len(b)-1:], collect(&got)); err != nil || len(got) != 1 || d.Buffered() != 0 {
		t.Fatalf("last byte: %v, %v, buffered %d", got, err, d.Buffered())
	}
}

func TestDecoderLargePacket(t *testing.T) {
	// Larger than the largest pooled buffer, so the unpooled growth path runs.
	body := make([]byte, 200_000)
	for i := range body {
		body[i] = byte(i * 7)
	}
	wire, _ := Encode(Data, body)
	wire = append(wire, hx("03 00 00 00")...)
	for _, size := range []int{1, 3, 1460, 4096, 65536, len(wire)} {
		d := NewDecoder(1 << 20)
		var got []pkt
		for off := 0; off < len(wire); off += size {
			if err := d.Feed(wire[off:min(off+size, len(wire))], collect(&got)); err != nil {
				t.Fatalf("chunk %d: %v", size, err)
			}
		}
		if len(got) != 2 || got[0].t != Data || got[0].body != string(body) || got[1].t != Heartbeat {
			t.Fatalf("chunk %d: got %d packets", size, len(got))
		}
	}
}

func TestDecoderMaxBody(t *testing.T) {
	tests := []struct {
		name    string
		maxBody int
		wire    string
		want    error
	}{
		{"default limit, 64 KiB ok", 0, "04 01 00 00", nil},
		{"default limit, 64 KiB + 1", 0, "04 01 00 01", ErrTooLarge},
		{"limit 8, body 8 ok", 8, "04 00 00 08", nil},
		{"limit 8, body 9", 8, "04 00 00 09", ErrTooLarge},
		{"limit 8, heartbeat", 8, "03 00 00 00", nil},
		{"limit over 2^24-1 clamps", 1 << 30, "04 ff ff ff", nil},
		{"negative limit is default", -1, "04 01 00 01", ErrTooLarge},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			hdr := hx(tt.wire)
			// Whole header in one chunk, then byte at a time.
			for _, cuts := range [][]int{nil, {1, 2, 3}} {
				d := NewDecoder(tt.maxBody)
				_, err := feedChunks(t, d, hdr, cuts...)
				if !errors.Is(err, tt.want) {
					t.Fatalf("cuts %v: err %v, want %v", cuts, err, tt.want)
				}
				if tt.want != nil && d.Buffered() != 0 {
					t.Fatalf("cuts %v: Buffered() = %d after %v", cuts, d.Buffered(), err)
				}
			}
		})
	}
}

func TestDecoderZeroValue(t *testing.T) {
	var d Decoder // ready for use with DefaultMaxBody
	var got []pkt
	if err := d.Feed(hx("01 00 00 02 7b 7d 04 01 00 01"), collect(&got)); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("err = %v, want ErrTooLarge", err)
	}
	if len(got) != 1 || got[0] != (pkt{Handshake, "{}"}) {
		t.Fatalf("got %v", got)
	}
}

// TestDecoderErrors feeds streams with a bad packet after good ones, whole
// and byte at a time: the good packets are delivered, then the sentinel error,
// before any byte of the bad packet's body is buffered; the error is sticky.
func TestDecoderErrors(t *testing.T) {
	tests := []struct {
		name    string
		maxBody int
		wire    string
		npkts   int // packets delivered before the error
		want    error
	}{
		{"type 0x00", 0, "00 00 00 00", 0, ErrWrongType},
		{"type 0x06", 0, "06 00 00 00", 0, ErrWrongType},
		{"type 0xff", 0, "ff 00 00 02 7b 7d", 0, ErrWrongType},
		{"heartbeat then type 0x07", 0, "03 00 00 00 07 00 00 00", 1, ErrWrongType},
		{"oversized after handshake", 0, "01 00 00 02 7b 7d 04 01 00 01 00 00", 1, ErrTooLarge},
		{"limit 4, body 5", 4, "04 00 00 05 00 01 02 03 04", 0, ErrTooLarge},
		{"max declared length", 0, "04 ff ff ff", 0, ErrTooLarge},
		{"valid type, absurd length, invalid next", 16, "04 00 01 00 ff", 0, ErrTooLarge},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := hx(tt.wire)
			var every []int
			for i := 1; i < len(b); i++ {
				every = append(every, i)
			}
			for _, cuts := range [][]int{nil, every} {
				d := NewDecoder(tt.maxBody)
				got, err := feedChunks(t, d, b, cuts...)
				if !errors.Is(err, tt.want) || len(got) != tt.npkts {
					t.Fatalf("cuts %v: %d packets, err %v; want %d, %v", cuts, len(got), err, tt.npkts, tt.want)
				}
				if d.Buffered() != 0 {
					t.Fatalf("Buffered() = %d after error", d.Buffered())
				}
				// Sticky: the same error, whatever comes next, and no packet.
				if err2 := d.Feed(hx("03 00 00 00"), collect(&got)); err2 != err || len(got) != tt.npkts {
					t.Fatalf("after error: Feed = %v, %d packets; want %v", err2, len(got), err)
				}
			}
		})
	}
}

func TestDecoderTruncated(t *testing.T) {
	// A stream that ends mid-packet is not an error at this layer: the
	// decoder waits for more, holding exactly the bytes it has seen.
	tests := []struct {
		wire     string
		npkts    int
		buffered int
	}{
		{"", 0, 0},
		{"04", 0, 1},
		{"04 00 00", 0, 3},
		{"04 00 00 05", 0, 4},
		{"04 00 00 05 01 02", 0, 6},
		{"03 00 00 00 04 00 00 05 01 02 03 04", 1, 8},
		{"06 00", 0, 2}, // the type is checked once the header is complete
	}
	for _, tt := range tests {
		t.Run(tt.wire, func(t *testing.T) {
			d := NewDecoder(0)
			got, err := feedChunks(t, d, hx(tt.wire))
			if err != nil || len(got) != tt.npkts || d.Buffered() != tt.buffered {
				t.Fatalf("%d packets, err %v, buffered %d; want %d, nil, %d",
					len(got), err, d.Buffered(), tt.npkts, tt.buffered)
			}
		})
	}
}

func TestDecoderHandlerError(t *testing.T) {
	errStop := errors.New("stop")
	b, _ := stream()
	for _, cuts := range [][]int{nil, {2}, {6, 9}} {
		d := NewDecoder(0)
		var got []pkt
		h := func(t Type, body []byte) error {
			got = append(got, pkt{t, string(body)})
			if t == Heartbeat {
				return errStop
			}
			return nil
		}
		var err error
		prev := 0
		for _, c := range append(cuts, len(b)) {
			if err = d.Feed(b[prev:c], h); err != nil {
				break
			}
			prev = c
		}
		if err != errStop || got[len(got)-1].t != Heartbeat || d.Buffered() != 0 {
			t.Fatalf("cuts %v: err %v, got %v", cuts, err, got)
		}
		n := len(got)
		if err := d.Feed(b, h); err != errStop || len(got) != n {
			t.Fatalf("not sticky: %v", err)
		}
	}
}

func TestDecoderInitResets(t *testing.T) {
	d := NewDecoder(4)
	if err := d.Feed(hx("04 00 00 05"), collect(new([]pkt))); !errors.Is(err, ErrTooLarge) {
		t.Fatal(err)
	}
	d.Init(0)
	var got []pkt
	if err := d.Feed(hx("04 00 00 05 01 02 03"), collect(&got)); err != nil || d.Buffered() != 7 {
		t.Fatalf("after Init: %v, buffered %d", err, d.Buffered())
	}
	d.Init(0) // drops the partial packet
	if err := d.Feed(hx("03 00 00 00"), collect(&got)); err != nil || len(got) != 1 || d.Buffered() != 0 {
		t.Fatalf("after second Init: %v, %v", got, err)
	}
}

// TestDecoderBufferGrowsWithInput checks that a header declaring a large body
// does not make the decoder allocate that body before it arrives.
func TestDecoderBufferGrowsWithInput(t *testing.T) {
	d := NewDecoder(MaxBodyLen)
	h := collect(new([]pkt))
	if err := d.Feed(hx("04 ff ff ff 01 02 03"), h); err != nil {
		t.Fatal(err)
	}
	if c := cap(*d.buf); c > minClass {
		t.Fatalf("3 body bytes of a 16 MiB body are held in a %d-byte buffer", c)
	}
	if err := d.Feed(make([]byte, 100_000), h); err != nil {
		t.Fatal(err)
	}
	if c := cap(*d.buf); c > 2*100_003 {
		t.Fatalf("100003 body bytes are held in a %d-byte buffer", c)
	}
}

func TestPoolClasses(t *testing.T) {
	for _, tt := range []struct{ n, class int }{
		{0, 0}, {1, 0}, {256, 0}, {257, 1}, {1024, 1}, {1025, 2}, {4096, 2},
		{16384, 3}, {16385, 4}, {65536, 4}, {65537, -1},
	} {
		if got := class(tt.n); got != tt.class {
			t.Errorf("class(%d) = %d, want %d", tt.n, got, tt.class)
		}
	}
	p := getBuf(300, 300)
	if cap(*p) != 1024 || len(*p) != 0 {
		t.Fatalf("getBuf(300) cap %d len %d", cap(*p), len(*p))
	}
	p = getBuf(70_000, 100_000)
	if cap(*p) != 100_000 {
		t.Fatalf("getBuf(70000, 100000) cap %d, want capped at total", cap(*p))
	}
	putBuf(p) // not a class size: dropped, must not panic
}

// normHex lower-cases s and collapses every run of white space and backquotes
// into one space, so that hex vectors can be found in docs/protocol.md however
// they are wrapped there.
func normHex(s string) string {
	return strings.Join(strings.Fields(strings.ToLower(strings.ReplaceAll(s, "`", " "))), " ")
}

// TestDocMirrorsVectors checks that docs/protocol.md shows the vectors above.
func TestDocMirrorsVectors(t *testing.T) {
	doc, err := os.ReadFile("../docs/protocol.md")
	if err != nil {
		t.Skipf("no protocol document: %v", err)
	}
	text := normHex(string(doc))
	for _, v := range vectors {
		wire := normHex(v.wire)
		if len(v.body) > 200 {
			wire = wire[:len("04 00 01 00")] // only the header is shown
		}
		if !strings.Contains(text, wire) {
			t.Errorf("docs/protocol.md lacks vector %q: %s", v.name, wire)
		}
	}
}
