package packet

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// refDecode is the obvious, unbuffered reading of a complete stream, the
// oracle for FuzzDecoder: the packets, the error that stops decoding, and how
// many bytes of an incomplete trailing packet remain.
func refDecode(b []byte, maxBody int) (pkts []pkt, err error, rest int) {
	for len(b) >= HeaderLen {
		t := Type(b[0])
		n := int(b[1])<<16 | int(b[2])<<8 | int(b[3])
		if !t.Valid() {
			return pkts, ErrWrongType, 0
		}
		if n > maxBody {
			return pkts, ErrTooLarge, 0
		}
		if len(b) < HeaderLen+n {
			break
		}
		pkts = append(pkts, pkt{t, string(b[HeaderLen : HeaderLen+n])})
		b = b[HeaderLen+n:]
	}
	return pkts, nil, len(b)
}

// fuzzSeeds are the seeds of FuzzDecoder: f.Add adds those that are not
// fileOnly, and -gencorpus writes all of them to testdata/fuzz/FuzzDecoder,
// where plain "go test" runs them too.
var fuzzSeeds = []struct {
	name     string
	data     []byte
	cuts     []byte
	maxBody  uint16
	fileOnly bool
}{
	{"handshake", hx("01 00 00 02 7b 7d"), nil, 0, false},
	{"heartbeat_bytewise", hx("03 00 00 00"), []byte{0, 0, 0}, 0, false},
	{"handshake_ack_then_data", hx("02 00 00 00 04 00 00 05 03 00 02 7b 7d"), []byte{5, 2}, 0, false},
	{"request_room_join", hx("04 00 00 0e 00 01 09 72 6f 6f 6d 2e 6a 6f 69 6e 7b 7d"), []byte{1, 6}, 0, false},
	{"kick", hx("05 00 00 15 7b 22 72 65 61 73 6f 6e 22 3a 22 73 68 75 74 64 6f 77 6e 22 7d"), []byte{3}, 0, false},
	{"wrong_type", hx("03 00 00 00 06 00 00 00"), []byte{4}, 0, false},
	{"too_large_limit_8", hx("04 00 00 09 00 00 00 00 00 00 00 00 00"), []byte{1}, 8, false},
	{"at_limit_8", hx("04 00 00 08 00 00 00 00 00 00 00 00 03 00 00 00"), []byte{7, 7}, 8, false},
	{"too_large_default", hx("04 01 00 01"), nil, 0, false},
	{"truncated_body", hx("04 00 00 05 01 02"), []byte{0}, 0, false},
	{"truncated_header", hx("04 00"), nil, 0, false},
	{"zero_type", hx("00 00 00 00"), nil, 0, false},
	{"body_300_split", append(hx("04 00 01 2c"), make([]byte, 300)...), []byte{100, 255}, 1000, false},
	{"all_vectors_stream", func() []byte { b, _ := stream(); return b }(), []byte{2, 0, 9, 1, 255, 3}, 0, true},
	{"split_header_then_wrong_type", hx("03 00 00 00 01 00 00 02 7b 7d 09 00 00 00"), []byte{0, 1, 2, 3, 4, 5}, 0, true},
	{"grow_across_classes", append(hx("04 00 07 d0"), make([]byte, 2000)...), []byte{200, 254, 254, 254, 254, 254, 254, 254}, 4000, true},
}

func FuzzDecoder(f *testing.F) {
	for _, s := range fuzzSeeds {
		if !s.fileOnly {
			f.Add(s.data, s.cuts, s.maxBody)
		}
	}
	f.Fuzz(func(t *testing.T, data, cuts []byte, maxBody uint16) {
		limit := int(maxBody)
		if limit == 0 {
			limit = DefaultMaxBody
		}
		want, wantErr, rest := refDecode(data, limit)

		// chunk sizes: all at once, from cuts (1..256 bytes each, cycling),
		// and one byte at a time.
		chunkings := [][]int{{len(data) + 1}, {1}}
		if len(cuts) > 0 {
			sizes := make([]int, len(cuts))
			for i, c := range cuts {
				sizes[i] = 1 + int(c)
			}
			chunkings = append(chunkings, sizes)
		}
		for _, sizes := range chunkings {
			d := NewDecoder(int(maxBody))
			var got []pkt
			var err error
			for off, i := 0, 0; off < len(data); i++ {
				end := min(len(data), off+sizes[i%len(sizes)])
				if err = d.Feed(data[off:end], collect(&got)); err != nil {
					break
				}
				off = end
			}
			if fmt.Sprint(got) != fmt.Sprint(want) {
				t.Fatalf("sizes %v: packets %v, want %v", sizes, got, want)
			}
			if !errors.Is(err, wantErr) {
				t.Fatalf("sizes %v: err %v, want %v", sizes, err, wantErr)
			}
			if err != nil {
				if d.Buffered() != 0 {
					t.Fatalf("sizes %v: Buffered() = %d after %v", sizes, d.Buffered(), err)
				}
				if err2 := d.Feed(data, collect(&got)); err2 != err || len(got) != len(want) {
					t.Fatalf("sizes %v: error not sticky: %v", sizes, err2)
				}
			} else if d.Buffered() != rest {
				t.Fatalf("sizes %v: Buffered() = %d, want %d", sizes, d.Buffered(), rest)
			}
			// Re-encoding the packets reproduces the consumed prefix.
			var enc []byte
			for _, p := range got {
				enc, _ = Append(enc, p.t, []byte(p.body))
			}
			if !bytes.HasPrefix(data, enc) {
				t.Fatalf("sizes %v: re-encoding % x is not a prefix of the input", sizes, enc)
			}
			if err == nil && len(enc)+rest != len(data) {
				t.Fatalf("sizes %v: %d bytes re-encoded + %d buffered != %d", sizes, len(enc), rest, len(data))
			}
		}
	})
}

var genCorpus = flag.Bool("gencorpus", false, "write the fuzz seeds to testdata/fuzz")

// TestGenCorpus writes fuzzSeeds as corpus files in the format of
// "go test fuzz v1" when run with -gencorpus, so that the seed corpus under
// testdata/fuzz/FuzzDecoder can be regenerated after the seeds change.
func TestGenCorpus(t *testing.T) {
	if !*genCorpus {
		t.Skip("run with -gencorpus to rewrite testdata/fuzz/FuzzDecoder")
	}
	dir := filepath.Join("testdata", "fuzz", "FuzzDecoder")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, s := range fuzzSeeds {
		body := fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n[]byte(%q)\nuint16(%d)\n", s.data, s.cuts, s.maxBody)
		if err := os.WriteFile(filepath.Join(dir, "seed_"+s.name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}
