// Package packet implements the outer framing of the pomelo/nano wire protocol:
// a 1-byte type, a 3-byte big-endian body length and the body. It holds the
// packet types, an encoder and an incremental decoder that accepts arbitrary
// chunks of a byte stream and enforces a body size limit before buffering.
package packet

import (
	"errors"
	"fmt"
)

// Type is the type of a packet, the first byte of its header.
type Type byte

// Packet types of the pomelo/nano protocol.
const (
	Handshake    Type = 0x01 // JSON handshake, both directions
	HandshakeAck Type = 0x02 // empty, client to server
	Heartbeat    Type = 0x03 // empty, both directions
	Data         Type = 0x04 // one message (see package message)
	Kick         Type = 0x05 // JSON {"reason":"..."}, server to client
)

// String returns the name of the packet type.
func (t Type) String() string {
	switch t {
	case Handshake:
		return "Handshake"
	case HandshakeAck:
		return "HandshakeAck"
	case Heartbeat:
		return "Heartbeat"
	case Data:
		return "Data"
	case Kick:
		return "Kick"
	}
	return fmt.Sprintf("Type(0x%02x)", byte(t))
}

// Valid reports whether t is one of the protocol's packet types.
func (t Type) Valid() bool { return t >= Handshake && t <= Kick }

const (
	// HeaderLen is the length of a packet header in bytes.
	HeaderLen = 4
	// MaxBodyLen is the largest body the 3-byte length field can describe.
	MaxBodyLen = 1<<24 - 1
	// DefaultMaxBody is the default body size limit of a Decoder.
	DefaultMaxBody = 64 << 10
)

// Errors returned by the encoder and the decoder. Callers branch on them with errors.Is.
var (
	ErrWrongType = errors.New("packet: unknown packet type")
	ErrTooLarge  = errors.New("packet: body exceeds size limit")
)

// Append appends the packet (t, body) to dst and returns the extended slice.
func Append(dst []byte, t Type, body []byte) ([]byte, error) {
	if !t.Valid() {
		return dst, fmt.Errorf("%w: 0x%02x", ErrWrongType, byte(t))
	}
	if len(body) > MaxBodyLen {
		return dst, fmt.Errorf("%w: %d bytes", ErrTooLarge, len(body))
	}
	n := len(body)
	dst = append(dst, byte(t), byte(n>>16), byte(n>>8), byte(n))
	return append(dst, body...), nil
}

// Encode returns a new buffer holding the packet (t, body).
func Encode(t Type, body []byte) ([]byte, error) {
	return Append(make([]byte, 0, HeaderLen+len(body)), t, body)
}

// PutHeader writes a packet header for a body of length n into b[:4].
// It is for callers that build the body in place after a reserved header.
func PutHeader(b []byte, t Type, n int) {
	_ = b[3]
	b[0], b[1], b[2], b[3] = byte(t), byte(n>>16), byte(n>>8), byte(n)
}

// Handler receives each decoded packet. The body aliases the decoder's input
// or its internal buffer and is valid only until Handler returns; it may be
// empty (or nil) for packets without a body. A non-nil error stops decoding
// and is returned by Feed.
type Handler func(t Type, body []byte) error

// Decoder splits a byte stream into packets. Feed it the stream in chunks of
// any size; it calls the handler once per complete packet. A packet that
// arrives whole inside one chunk is passed without copying or allocating;
// only a packet split across chunks is buffered, in a pooled buffer that
// grows with the bytes actually received (not with the declared length) and
// is released once the packet is complete, so an idle decoder holds no buffer.
//
// The zero value is ready for use with the DefaultMaxBody limit; Init or
// NewDecoder set another limit. A Decoder is not safe for concurrent use.
type Decoder struct {
	maxBody int // 0 means DefaultMaxBody
	hdr     [HeaderLen]byte
	nhdr    uint8   // header bytes held in hdr
	need    int     // body bytes still missing for the pending packet
	buf     *[]byte // pooled partial body, nil while no body byte is pending
	err     error   // sticky error: once set, Feed returns it
}

// NewDecoder returns a decoder that rejects bodies larger than maxBody bytes
// (DefaultMaxBody if maxBody <= 0, MaxBodyLen if maxBody > MaxBodyLen).
func NewDecoder(maxBody int) *Decoder {
	d := &Decoder{}
	d.Init(maxBody)
	return d
}

// Init resets d, releasing any partial packet and clearing a sticky error,
// and sets its body size limit (DefaultMaxBody if maxBody <= 0, MaxBodyLen if
// maxBody > MaxBodyLen).
func (d *Decoder) Init(maxBody int) {
	switch {
	case maxBody <= 0:
		maxBody = DefaultMaxBody
	case maxBody > MaxBodyLen:
		maxBody = MaxBodyLen
	}
	if d.buf != nil {
		putBuf(d.buf)
	}
	*d = Decoder{maxBody: maxBody}
}

// Buffered reports how many bytes of an incomplete packet (header and body)
// the decoder holds. It is 0 between packets and after an error.
func (d *Decoder) Buffered() int {
	n := int(d.nhdr)
	if d.buf != nil {
		n += len(*d.buf)
	}
	return n
}

// Feed decodes the packets in chunk, calling h for each complete one. An
// invalid type or an oversized declared length is reported as soon as the
// header is seen, before any body byte is buffered; after an error (including
// one returned by h) the decoder stays failed and Feed returns the same error.
func (d *Decoder) Feed(chunk []byte, h Handler) error {
	if d.err != nil {
		return d.err
	}
	for len(chunk) > 0 {
		switch {
		case d.nhdr == 0 && len(chunk) >= HeaderLen:
			// Fast path: the whole header, and maybe the body, is in chunk.
			t, n, err := d.header(chunk)
			if err != nil {
				return err
			}
			if end := HeaderLen + n; len(chunk) >= end {
				if err := h(t, chunk[HeaderLen:end:end]); err != nil {
					return d.fail(err)
				}
				chunk = chunk[end:]
				continue
			}
			copy(d.hdr[:], chunk)
			d.nhdr, d.need = HeaderLen, n
			chunk = chunk[HeaderLen:]
		case d.nhdr < HeaderLen:
			k := copy(d.hdr[d.nhdr:], chunk)
			d.nhdr += uint8(k)
			chunk = chunk[k:]
			if d.nhdr < HeaderLen {
				return nil
			}
			_, n, err := d.header(d.hdr[:])
			if err != nil {
				return err
			}
			d.need = n
		}
		// The header is complete; collect the body.
		if k := min(d.need, len(chunk)); k > 0 {
			d.buffer(chunk[:k])
			d.need -= k
			chunk = chunk[k:]
		}
		if d.need > 0 {
			return nil
		}
		var body []byte
		buf := d.buf
		if buf != nil {
			body = (*buf)[:len(*buf):len(*buf)]
		}
		t := Type(d.hdr[0])
		d.buf, d.nhdr = nil, 0
		err := h(t, body)
		if buf != nil {
			putBuf(buf)
		}
		if err != nil {
			return d.fail(err)
		}
	}
	return nil
}

// header validates a packet header held in b[:HeaderLen].
func (d *Decoder) header(b []byte) (Type, int, error) {
	t := Type(b[0])
	if !t.Valid() {
		return 0, 0, d.fail(fmt.Errorf("%w: 0x%02x", ErrWrongType, b[0]))
	}
	n := int(b[1])<<16 | int(b[2])<<8 | int(b[3])
	limit := d.maxBody
	if limit == 0 {
		limit = DefaultMaxBody
	}
	if n > limit {
		return 0, 0, d.fail(fmt.Errorf("%w: %d > %d bytes", ErrTooLarge, n, limit))
	}
	return t, n, nil
}

// buffer appends p to the partial body. The buffer grows with what has been
// received, so a peer that declares a large body and sends little of it makes
// the decoder hold little memory.
func (d *Decoder) buffer(p []byte) {
	if d.buf == nil || cap(*d.buf)-len(*d.buf) < len(p) {
		have := 0
		if d.buf != nil {
			have = len(*d.buf)
		}
		total := have + d.need // declared body length
		nb := getBuf(have+len(p), total)
		if d.buf != nil {
			*nb = append(*nb, *d.buf...)
			putBuf(d.buf)
		}
		d.buf = nb
	}
	*d.buf = append(*d.buf, p...)
}

func (d *Decoder) fail(err error) error {
	d.err = err
	if d.buf != nil {
		putBuf(d.buf)
		d.buf = nil
	}
	d.nhdr, d.need = 0, 0
	return err
}
