package message

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// fuzzSeeds are the seeds of FuzzDecode: f.Add adds those that are not
// fileOnly, and -gencorpus writes all of them to testdata/fuzz/FuzzDecode,
// where plain "go test" runs them too.
var fuzzSeeds = []struct {
	name     string
	data     []byte
	maxData  uint16
	fileOnly bool
}{
	{"request_room_join", hx("00 01 09 72 6f 6f 6d 2e 6a 6f 69 6e 7b 7d"), 0, false},
	{"request_compressed", hx("01 01 00 01 7b 7d"), 0, false},
	{"notify_compressed", hx("03 00 02 7b 22 74 65 78 74 22 3a 22 68 69 22 7d"), 0, false},
	{"response_error_404", hx("24 05 7b 22 63 6f 64 65 22 3a 34 30 34 2c 22 6d 65 73 73 61 67 65 22 3a 22 6e 6f 74 20 66 6f 75 6e 64 22 7d"), 0, false},
	{"push_onChat", hx("06 06 6f 6e 43 68 61 74 7b 22 74 65 78 74 22 3a 22 68 69 22 7d"), 0, false},
	{"id_2_32", hx("04 80 80 80 80 10"), 0, false},
	{"id_max", hx("04 ff ff ff ff ff ff ff ff ff 01"), 0, false},
	{"varint_overflow", hx("04 ff ff ff ff ff ff ff ff ff 02"), 0, false},
	{"zlib_response", hx("14 01 " + zlibHelloWorld), 0, false},
	{"zlib_over_limit", hx("16 01 61 " + zlib100a), 99, false},
	{"unknown_code", hx("01 01 00 63"), 0, false},
	{"short_route", hx("00 01 05 61 62"), 0, false},
	{"bad_flag", hx("44 01"), 0, false},
	{"data_over_limit", hx("04 01 7b 22 6f 6b 22 3a 74 72 75 65 7d"), 10, false},
	{"nonminimal_varint", hx("04 80 80 00 7b 7d"), 0, true}, // id 0 in 3 bytes re-encodes as 1 byte
	{"zlib_push_compressed_route", hx("17 00 03 " + zlibHelloWorld), 0, true},
	{"zlib_bad_checksum", hx("14 01 " + zlibHelloWorld[:len(zlibHelloWorld)-2] + "f8"), 0, true},
	{"plain_route_with_code", hx("06 06 6f 6e 43 68 61 74 7b 7d"), 0, true}, // re-encodes compressed
}

// FuzzDecode checks that Decode never panics, fails only with the package's
// sentinel errors, and that what it decodes re-encodes to an equivalent
// message (Encode(Decode(b)) decodes to the same message; the bytes may differ:
// a known plain route gets compressed, zlib data is sent inflated, a
// non-minimal varint becomes minimal).
func FuzzDecode(f *testing.F) {
	for _, s := range fuzzSeeds {
		if !s.fileOnly {
			f.Add(s.data, s.maxData)
		}
	}
	f.Fuzz(func(t *testing.T, data []byte, maxData uint16) {
		var m Message
		err := Decode(data, &m, testDict, int(maxData))
		if err != nil {
			if !errors.Is(err, ErrInvalidMessage) && !errors.Is(err, ErrUnknownCode) && !errors.Is(err, ErrTooLarge) {
				t.Fatalf("Decode(% x): error %v is no sentinel", data, err)
			}
			return
		}
		if maxData > 0 && len(m.Data) > int(maxData) {
			t.Fatalf("Decode(% x): %d data bytes over limit %d", data, len(m.Data), maxData)
		}
		enc, err := Encode(&m, testDict)
		if err != nil {
			t.Fatalf("Encode(%v): %v", &m, err)
		}
		var m2 Message
		if err := Decode(enc, &m2, testDict, int(maxData)); err != nil || !equal(&m, &m2) {
			t.Fatalf("Decode(Encode(%v)) = %v, %v", &m, &m2, err)
		}
		// Without a dictionary a route is always sent plain, and comes back.
		enc, err = Encode(&m, nil)
		if err != nil {
			t.Fatalf("Encode(%v, nil): %v", &m, err)
		}
		if err := Decode(enc, &m2, nil, int(maxData)); err != nil || !equal(&m, &m2) {
			t.Fatalf("Decode(Encode(%v, nil)) = %v, %v", &m, &m2, err)
		}
	})
}

var genCorpus = flag.Bool("gencorpus", false, "write the fuzz seeds to testdata/fuzz")

// TestGenCorpus writes fuzzSeeds as corpus files in the format of
// "go test fuzz v1" when run with -gencorpus.
func TestGenCorpus(t *testing.T) {
	if !*genCorpus {
		t.Skip("run with -gencorpus to rewrite testdata/fuzz/FuzzDecode")
	}
	dir := filepath.Join("testdata", "fuzz", "FuzzDecode")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, s := range fuzzSeeds {
		body := fmt.Sprintf("go test fuzz v1\n[]byte(%q)\nuint16(%d)\n", s.data, s.maxData)
		if err := os.WriteFile(filepath.Join(dir, "seed_"+s.name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}
