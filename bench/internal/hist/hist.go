// Package hist is a small log-linear latency histogram: values (nanoseconds)
// below 128 are exact, larger ones fall into 64 sub-buckets per power of two
// (relative error under 1.6%). Record is lock-free, so event loops on several
// goroutines can share one histogram.
package hist

import (
	"math"
	"math/bits"
	"sort"
	"sync/atomic"
	"time"
)

const (
	subBits  = 6
	sub      = 1 << subBits // sub-buckets per power of two
	linear   = 2 * sub      // values below this are exact
	maxExp   = 40           // up to 2^(40+7) ns, about 39 hours
	nBuckets = linear + maxExp*sub
)

// H is a latency histogram. The zero value is ready to use.
type H struct {
	counts [nBuckets]atomic.Uint64
	max    atomic.Int64
	sum    atomic.Int64
	n      atomic.Uint64
}

func index(v int64) int {
	if v < linear {
		if v < 0 {
			return 0
		}
		return int(v)
	}
	e := bits.Len64(uint64(v)) - (subBits + 1) // >= 1
	if e > maxExp {
		return nBuckets - 1
	}
	m := int(v >> uint(e)) // in [sub, 2*sub)
	return linear + (e-1)*sub + (m - sub)
}

// bounds returns the lowest value of bucket i and its width.
func bounds(i int) (lo, width int64) {
	if i < linear {
		return int64(i), 1
	}
	e := (i-linear)/sub + 1
	m := (i-linear)%sub + sub
	return int64(m) << uint(e), int64(1) << uint(e)
}

// Record adds one value in nanoseconds.
func (h *H) Record(ns int64) {
	if ns < 0 {
		ns = 0
	}
	h.counts[index(ns)].Add(1)
	h.n.Add(1)
	h.sum.Add(ns)
	for {
		m := h.max.Load()
		if ns <= m || h.max.CompareAndSwap(m, ns) {
			break
		}
	}
}

// RecordDuration adds one duration.
func (h *H) RecordDuration(d time.Duration) { h.Record(int64(d)) }

// Count returns the number of values recorded.
func (h *H) Count() uint64 { return h.n.Load() }

// Snapshot is a serializable, mergeable copy of a histogram: sparse
// [bucket index, count] pairs.
type Snapshot struct {
	Buckets [][2]uint64 `json:"buckets"`
	N       uint64      `json:"n"`
	Sum     int64       `json:"sum"`
	Max     int64       `json:"max"`
}

// Snapshot copies the histogram.
func (h *H) Snapshot() Snapshot {
	var s Snapshot
	for i := range h.counts {
		if c := h.counts[i].Load(); c > 0 {
			s.Buckets = append(s.Buckets, [2]uint64{uint64(i), c})
			s.N += c
		}
	}
	s.Sum = h.sum.Load()
	s.Max = h.max.Load()
	return s
}

// Reset clears the histogram (not atomically with concurrent Records).
func (h *H) Reset() {
	for i := range h.counts {
		h.counts[i].Store(0)
	}
	h.max.Store(0)
	h.sum.Store(0)
	h.n.Store(0)
}

// Merge adds o to s.
func (s *Snapshot) Merge(o Snapshot) {
	m := make(map[uint64]uint64, len(s.Buckets)+len(o.Buckets))
	for _, b := range s.Buckets {
		m[b[0]] += b[1]
	}
	for _, b := range o.Buckets {
		m[b[0]] += b[1]
	}
	s.Buckets = s.Buckets[:0]
	for i, c := range m {
		s.Buckets = append(s.Buckets, [2]uint64{i, c})
	}
	sort.Slice(s.Buckets, func(i, j int) bool { return s.Buckets[i][0] < s.Buckets[j][0] })
	s.N += o.N
	s.Sum += o.Sum
	s.Max = max(s.Max, o.Max)
}

// Quantile returns the value at quantile q (0..1) in nanoseconds: the middle
// of the bucket holding it, capped at the maximum seen.
func (s *Snapshot) Quantile(q float64) int64 {
	if s.N == 0 {
		return 0
	}
	rank := uint64(math.Ceil(q * float64(s.N)))
	rank = max(rank, 1)
	var seen uint64
	for _, b := range s.Buckets {
		seen += b[1]
		if seen >= rank {
			lo, w := bounds(int(b[0]))
			return min(lo+w/2, s.Max)
		}
	}
	return s.Max
}

// Mean returns the mean in nanoseconds.
func (s *Snapshot) Mean() float64 {
	if s.N == 0 {
		return 0
	}
	return float64(s.Sum) / float64(s.N)
}

// CDF returns (value ns, cumulative fraction) points, one per non-empty bucket.
func (s *Snapshot) CDF() [][2]float64 {
	var out [][2]float64
	var seen uint64
	for _, b := range s.Buckets {
		seen += b[1]
		lo, w := bounds(int(b[0]))
		out = append(out, [2]float64{float64(lo + w), float64(seen) / float64(s.N)})
	}
	return out
}
