package hist

import "testing"

func TestQuantiles(t *testing.T) {
	var h H
	for i := int64(1); i <= 100000; i++ {
		h.Record(i * 1000) // 1 µs .. 100 ms
	}
	s := h.Snapshot()
	for _, c := range []struct {
		q    float64
		want int64
	}{{0.5, 50_000_000}, {0.99, 99_000_000}, {0.999, 99_900_000}} {
		got := s.Quantile(c.q)
		if d := float64(got-c.want) / float64(c.want); d > 0.02 || d < -0.02 {
			t.Errorf("q%v = %d, want ~%d", c.q, got, c.want)
		}
	}
	var o Snapshot
	o.Merge(s)
	o.Merge(s)
	if o.N != 2*s.N || o.Quantile(0.5) != s.Quantile(0.5) {
		t.Fatalf("merge: n=%d p50=%d", o.N, o.Quantile(0.5))
	}
	for i := 0; i < nBuckets; i++ {
		lo, w := bounds(i)
		if index(lo) != i || index(lo+w-1) != i {
			t.Fatalf("bucket %d: lo %d w %d -> %d %d", i, lo, w, index(lo), index(lo+w-1))
		}
	}
}
