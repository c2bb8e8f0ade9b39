package packet

import "sync"

// Buffers for packets split across chunks come from size-classed pools so a
// fragmented stream does not allocate per packet and an idle decoder holds
// none. The pools hold *[]byte and the decoder keeps the pointer while it uses
// the buffer, so getting and putting a buffer does not allocate either.
var pools [numClasses]sync.Pool

const (
	numClasses = 5   // 256 B, 1 KiB, 4 KiB, 16 KiB, 64 KiB
	minClass   = 256 // size of class 0; each class is 4 times the previous one
)

// class returns the index of the smallest class holding n bytes, or -1.
func class(n int) int {
	for i, c := 0, minClass; i < numClasses; i, c = i+1, c<<2 {
		if n <= c {
			return i
		}
	}
	return -1
}

// getBuf returns an empty buffer with room for at least n bytes of a body of
// total bytes (n <= total): a pooled buffer of n's class up to the largest
// class, beyond it an unpooled one of twice n, capped at total, so that large
// bodies grow geometrically but never past their declared length.
func getBuf(n, total int) *[]byte {
	i := class(n)
	if i < 0 {
		b := make([]byte, 0, max(n, min(total, 2*n)))
		return &b
	}
	if p, ok := pools[i].Get().(*[]byte); ok {
		*p = (*p)[:0]
		return p
	}
	b := make([]byte, 0, minClass<<(2*i))
	return &b
}

// putBuf returns a buffer obtained from getBuf to its pool; buffers that are
// not of a class size are left to the garbage collector.
func putBuf(p *[]byte) {
	c := cap(*p)
	i := class(c)
	if i < 0 || c != minClass<<(2*i) {
		return
	}
	*p = (*p)[:0]
	pools[i].Put(p)
}
