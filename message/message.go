// Package message implements the inner layer of the pomelo/nano wire protocol,
// the body of a Data packet: a flag byte, a varint message id, a route (plain
// or dictionary-compressed) and the payload. It also holds the route
// dictionary and the payload serializers.
package message

import (
	"bytes"
	"compress/zlib"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"
)

// Type is the type of a message.
type Type byte

// Message types.
const (
	Request  Type = 0x00
	Notify   Type = 0x01
	Response Type = 0x02
	Push     Type = 0x03
)

// String returns the name of the message type.
func (t Type) String() string {
	switch t {
	case Request:
		return "Request"
	case Notify:
		return "Notify"
	case Response:
		return "Response"
	case Push:
		return "Push"
	}
	return fmt.Sprintf("Type(%d)", byte(t))
}

// Flag bits of the first byte, besides the type in bits 1-3.
const (
	FlagRouteCompressed = 0x01 // route is a 2-byte dictionary code
	FlagZlib            = 0x10 // data is zlib-compressed (pitaya's convention)
	FlagError           = 0x20 // a Response that carries an error
	typeMask            = 0x07
	knownFlags          = FlagRouteCompressed | FlagZlib | FlagError | typeMask<<1
)

// MaxRouteLen is the longest route that can be sent uncompressed.
const MaxRouteLen = 255

// Errors returned by Encode and Decode. Callers branch on them with errors.Is.
var (
	ErrInvalidMessage = errors.New("message: invalid message")
	ErrRouteTooLong   = errors.New("message: route longer than 255 bytes")
	ErrUnknownCode    = errors.New("message: unknown route code")
	ErrTooLarge       = errors.New("message: data exceeds size limit")
)

// Message is one decoded or to-be-encoded message. After Decode, Data aliases
// the decoded buffer unless it was zlib-compressed.
type Message struct {
	Type  Type
	ID    uint64 // Request and Response only
	Route string // Request, Notify and Push only
	Data  []byte
	Error bool // Response only: Data is an error body
}

func (t Type) hasID() bool    { return t == Request || t == Response }
func (t Type) hasRoute() bool { return t == Request || t == Notify || t == Push }

// String describes m for logs and test failures.
func (m *Message) String() string {
	return fmt.Sprintf("%s id=%d route=%q error=%t data=%q", m.Type, m.ID, m.Route, m.Error, m.Data)
}

// Append appends the encoding of m to dst. The route is compressed when dict
// (which may be nil) has a code for it.
func Append(dst []byte, m *Message, dict *Dictionary) ([]byte, error) {
	if m.Type > Push {
		return dst, fmt.Errorf("%w: type %d", ErrInvalidMessage, m.Type)
	}
	flag := byte(m.Type) << 1
	var code uint16
	compressed := false
	if m.Type.hasRoute() {
		code, compressed = dict.Code(m.Route)
		if compressed {
			flag |= FlagRouteCompressed
		} else if len(m.Route) > MaxRouteLen {
			return dst, fmt.Errorf("%w: %q", ErrRouteTooLong, m.Route)
		}
	}
	if m.Error && m.Type == Response {
		flag |= FlagError
	}
	dst = append(dst, flag)
	if m.Type.hasID() {
		dst = binary.AppendUvarint(dst, m.ID)
	}
	if m.Type.hasRoute() {
		if compressed {
			dst = append(dst, byte(code>>8), byte(code))
		} else {
			dst = append(dst, byte(len(m.Route)))
			dst = append(dst, m.Route...)
		}
	}
	return append(dst, m.Data...), nil
}

// Encode returns the encoding of m in a new buffer.
func Encode(m *Message, dict *Dictionary) ([]byte, error) {
	return Append(make([]byte, 0, 8+len(m.Route)+len(m.Data)), m, dict)
}

// Decode parses b into m. A compressed route is resolved through dict; a plain
// route known to dict is returned without allocating. zlib-compressed data is
// inflated (into a new buffer), and the data, inflated or not, is rejected
// with ErrTooLarge beyond maxData bytes. maxData <= 0 means no limit, which a
// server must not use for client input: zlib inflates up to about 1000 times.
func Decode(b []byte, m *Message, dict *Dictionary, maxData int) error {
	*m = Message{}
	if len(b) < 1 {
		return fmt.Errorf("%w: empty", ErrInvalidMessage)
	}
	flag := b[0]
	if flag&^knownFlags != 0 {
		return fmt.Errorf("%w: flag 0x%02x", ErrInvalidMessage, flag)
	}
	m.Type = Type(flag >> 1 & typeMask)
	if m.Type > Push {
		return fmt.Errorf("%w: type %d", ErrInvalidMessage, m.Type)
	}
	if flag&FlagError != 0 {
		if m.Type != Response {
			return fmt.Errorf("%w: error flag on %s", ErrInvalidMessage, m.Type)
		}
		m.Error = true
	}
	b = b[1:]
	if m.Type.hasID() {
		id, n := binary.Uvarint(b)
		if n <= 0 {
			return fmt.Errorf("%w: bad message id varint", ErrInvalidMessage)
		}
		m.ID = id
		b = b[n:]
	}
	if m.Type.hasRoute() {
		if flag&FlagRouteCompressed != 0 {
			if len(b) < 2 {
				return fmt.Errorf("%w: short route code", ErrInvalidMessage)
			}
			code := uint16(b[0])<<8 | uint16(b[1])
			r, ok := dict.Route(code)
			if !ok {
				return fmt.Errorf("%w: %d", ErrUnknownCode, code)
			}
			m.Route = r
			b = b[2:]
		} else {
			if len(b) < 1 {
				return fmt.Errorf("%w: missing route length", ErrInvalidMessage)
			}
			n := int(b[0])
			if len(b) < 1+n {
				return fmt.Errorf("%w: short route", ErrInvalidMessage)
			}
			m.Route = dict.intern(b[1 : 1+n])
			b = b[1+n:]
		}
	} else if flag&FlagRouteCompressed != 0 {
		return fmt.Errorf("%w: route flag on %s", ErrInvalidMessage, m.Type)
	}
	if flag&FlagZlib != 0 {
		data, err := inflate(b, maxData)
		if err != nil {
			return err
		}
		b = data
	} else if maxData > 0 && len(b) > maxData {
		return fmt.Errorf("%w: %d > %d bytes", ErrTooLarge, len(b), maxData)
	}
	if len(b) > 0 {
		m.Data = b
	}
	return nil
}

// inflaters are reused zlib readers: a fresh one allocates about 40 KiB.
var inflaters sync.Pool // *inflater

type inflater struct {
	src bytes.Reader
	zr  io.ReadCloser // also a zlib.Resetter
}

func inflate(b []byte, maxData int) ([]byte, error) {
	f, _ := inflaters.Get().(*inflater)
	if f == nil {
		f = new(inflater)
	}
	defer func() {
		f.src.Reset(nil) // do not keep b reachable from the pool
		inflaters.Put(f)
	}()
	f.src.Reset(b)
	var err error
	if f.zr == nil {
		f.zr, err = zlib.NewReader(&f.src) // nil on error
	} else {
		err = f.zr.(zlib.Resetter).Reset(&f.src, nil)
	}
	if err != nil {
		return nil, fmt.Errorf("%w: zlib: %v", ErrInvalidMessage, err)
	}
	var r io.Reader = f.zr
	if maxData > 0 {
		r = io.LimitReader(f.zr, int64(maxData)+1)
	}
	out, err := io.ReadAll(r)
	if err != nil {
		return nil, fmt.Errorf("%w: zlib: %v", ErrInvalidMessage, err)
	}
	if maxData > 0 && len(out) > maxData {
		return nil, fmt.Errorf("%w: inflated data over %d bytes", ErrTooLarge, maxData)
	}
	return out, nil
}
