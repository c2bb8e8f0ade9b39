package packet

import (
	"bytes"
	"testing"
)

// nopHandler is a package-level handler so that passing it does not allocate.
func nopHandler(Type, []byte) error { return nil }

// dataStream returns n Data packets of size bytes each, back to back.
func dataStream(n, size int) []byte {
	p, _ := Encode(Data, bytes.Repeat([]byte{0x42}, size))
	return bytes.Repeat(p, n)
}

func skipAllocTest(t *testing.T) {
	if raceEnabled {
		t.Skip("allocation counts are not meaningful with -race")
	}
	if testing.Short() {
		t.Skip("short")
	}
}

// feedInChunks feeds b to d in chunks of size bytes.
func feedInChunks(d *Decoder, b []byte, size int) error {
	for off := 0; off < len(b); off += size {
		if err := d.Feed(b[off:min(off+size, len(b))], nopHandler); err != nil {
			return err
		}
	}
	return nil
}

func TestAllocsFeedWholePackets(t *testing.T) {
	skipAllocTest(t)
	d := NewDecoder(0)
	for _, n := range []int{1, 16} {
		chunk := dataStream(n, 100)
		allocs := testing.AllocsPerRun(1000, func() {
			if err := d.Feed(chunk, nopHandler); err != nil {
				t.Fatal(err)
			}
		})
		if allocs != 0 {
			t.Errorf("Feed of %d whole packets: %v allocs, want 0", n, allocs)
		}
	}
}

// TestAllocsFeedFragmented checks that a stream whose packets straddle
// chunks does not allocate in steady state: the partial-body buffers come
// from the pools and go back to them, boxed pointer and all.
func TestAllocsFeedFragmented(t *testing.T) {
	skipAllocTest(t)
	tests := []struct {
		name        string
		stream      []byte
		chunk       int
		wantPackets int
	}{
		{"100 B packets in 7 B chunks", dataStream(8, 100), 7, 8},
		{"100 B packets in 150 B chunks", dataStream(8, 100), 150, 8},
		{"3000 B packets in 1460 B chunks", dataStream(4, 3000), 1460, 4},
		{"60 KiB packets in 16 KiB chunks", dataStream(2, 60<<10), 16 << 10, 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := NewDecoder(0)
			allocs := testing.AllocsPerRun(200, func() {
				if err := feedInChunks(d, tt.stream, tt.chunk); err != nil {
					t.Fatal(err)
				}
			})
			if d.Buffered() != 0 {
				t.Fatalf("Buffered() = %d at the end of the stream", d.Buffered())
			}
			if allocs != 0 {
				t.Errorf("%v allocs per stream, want 0", allocs)
			}
		})
	}
}

func BenchmarkFeed(b *testing.B) {
	benches := []struct {
		name   string
		stream []byte
		chunk  int
	}{
		{"1packet-100B", dataStream(1, 100), 1 << 30},
		{"16packets-100B", dataStream(16, 100), 1 << 30},
		{"fragmented-100B-in-7B", dataStream(16, 100), 7},
		{"fragmented-100B-in-150B", dataStream(16, 100), 150},
		{"fragmented-8KiB-in-1460B", dataStream(4, 8<<10), 1460},
	}
	for _, bb := range benches {
		b.Run(bb.name, func(b *testing.B) {
			d := NewDecoder(0)
			b.ReportAllocs()
			b.SetBytes(int64(len(bb.stream)))
			for b.Loop() {
				if err := feedInChunks(d, bb.stream, bb.chunk); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkAppend(b *testing.B) {
	body := bytes.Repeat([]byte{0x42}, 100)
	buf := make([]byte, 0, 256)
	b.ReportAllocs()
	for b.Loop() {
		buf, _ = Append(buf[:0], Data, body)
	}
}
