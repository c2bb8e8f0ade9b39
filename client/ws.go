package client

import (
	"bufio"
	"crypto/rand"
	"crypto/sha1"
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"strings"
	"unicode/utf8"
)

// The client side of WebSocket (RFC 6455), as much as the protocol needs:
// the opening handshake, masked binary frames out, and unmasked frames in
// (binary, continuation, ping, pong, close). Frames are treated as chunks of
// one byte stream, so a frame may hold several packets or part of one.

// WebSocket opcodes.
const (
	opContinuation = 0x0
	opText         = 0x1
	opBinary       = 0x2
	opClose        = 0x8
	opPing         = 0x9
	opPong         = 0xa
)

const wsGUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

// wsAccept computes the Sec-WebSocket-Accept value for a key.
func wsAccept(key string) string {
	h := sha1.Sum([]byte(key + wsGUID))
	return base64.StdEncoding.EncodeToString(h[:])
}

// wsUpgrade performs the opening handshake on nc and returns the buffered
// reader to read frames from (it may already hold the first frames).
func wsUpgrade(nc net.Conn, host, path string, header http.Header) (*bufio.Reader, error) {
	var nonce [16]byte
	rand.Read(nonce[:])
	key := base64.StdEncoding.EncodeToString(nonce[:])
	var b strings.Builder
	fmt.Fprintf(&b, "GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
		"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n", path, host, key)
	for k, vs := range header {
		for _, v := range vs {
			fmt.Fprintf(&b, "%s: %s\r\n", k, v)
		}
	}
	b.WriteString("\r\n")
	if _, err := io.WriteString(nc, b.String()); err != nil {
		return nil, err
	}
	br := bufio.NewReaderSize(nc, 4096)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodGet})
	if err != nil {
		return nil, fmt.Errorf("websocket upgrade: %w", err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		resp.Body.Close()
		return nil, fmt.Errorf("websocket upgrade: status %s: %s", resp.Status, strings.TrimSpace(string(msg)))
	}
	if !headerHasToken(resp.Header, "Upgrade", "websocket") || !headerHasToken(resp.Header, "Connection", "upgrade") {
		return nil, fmt.Errorf("websocket upgrade: %w: missing Upgrade/Connection headers", ErrProtocol)
	}
	if got := resp.Header.Get("Sec-WebSocket-Accept"); got != wsAccept(key) {
		return nil, fmt.Errorf("websocket upgrade: %w: bad Sec-WebSocket-Accept %q", ErrProtocol, got)
	}
	if ext := resp.Header.Get("Sec-WebSocket-Extensions"); ext != "" {
		return nil, fmt.Errorf("websocket upgrade: %w: unrequested extensions %q", ErrProtocol, ext)
	}
	return br, nil
}

func headerHasToken(h http.Header, name, token string) bool {
	for _, v := range h.Values(name) {
		for _, t := range strings.Split(v, ",") {
			if strings.EqualFold(strings.TrimSpace(t), token) {
				return true
			}
		}
	}
	return false
}

// wsAppendFrame appends a final, masked frame with opcode op to dst. build
// appends the payload; it runs once, and the payload is masked in place.
func wsAppendFrame(dst []byte, op byte, build func([]byte) ([]byte, error)) ([]byte, error) {
	const maxHdr = 14
	start := len(dst)
	dst = append(dst, make([]byte, maxHdr)...)
	dst, err := build(dst)
	if err != nil {
		return dst[:start], err
	}
	payload := dst[start+maxHdr:]
	n := len(payload)
	var hdr [maxHdr]byte
	hdr[0] = 0x80 | op
	h := 2
	switch {
	case n <= 125:
		hdr[1] = byte(n)
	case n <= 0xffff:
		hdr[1] = 126
		binary.BigEndian.PutUint16(hdr[2:], uint16(n))
		h += 2
	default:
		hdr[1] = 127
		binary.BigEndian.PutUint64(hdr[2:], uint64(n))
		h += 8
	}
	hdr[1] |= 0x80
	key := mrand.Uint32()
	binary.BigEndian.PutUint32(hdr[h:], key)
	h += 4
	wsMask(payload, key, 0)
	// Move the header next to the payload, then shift the frame to start.
	copy(dst[start+maxHdr-h:], hdr[:h])
	copy(dst[start:], dst[start+maxHdr-h:])
	return dst[:len(dst)-(maxHdr-h)], nil
}

// wsMask XORs b with the masking key, starting at payload offset pos.
func wsMask(b []byte, key uint32, pos int) {
	var k [4]byte
	binary.BigEndian.PutUint32(k[:], key)
	for i := range b {
		b[i] ^= k[(pos+i)&3]
	}
}

// wsReader reads the payload of data frames as one stream. Its state survives
// a read interrupted by a deadline: a frame header is consumed only once it
// is buffered whole, and control frames (at most 125 bytes) likewise.
type wsReader struct {
	br        *bufio.Reader
	conn      *Conn
	remaining int64 // payload bytes left in the current data frame
	inMessage bool  // a fragmented message is in progress
	buf       []byte
}

// next returns the next chunk of data-frame payload, valid until the next call.
func (r *wsReader) next() ([]byte, error) {
	for r.remaining == 0 {
		if err := r.frameHeader(); err != nil {
			return nil, err
		}
	}
	if r.buf == nil {
		r.buf = make([]byte, 4096)
	}
	n, err := r.br.Read(r.buf[:min(int64(len(r.buf)), r.remaining)])
	r.remaining -= int64(n)
	return r.buf[:n], err
}

// frameHeader consumes one frame header; control frames are handled whole.
func (r *wsReader) frameHeader() error {
	b, err := r.br.Peek(2)
	if err != nil {
		return err
	}
	fin, rsv, op := b[0]&0x80 != 0, b[0]&0x70, b[0]&0x0f
	masked, n := b[1]&0x80 != 0, int64(b[1]&0x7f)
	h := 2
	switch n {
	case 126:
		h += 2
	case 127:
		h += 8
	}
	if masked {
		h += 4
	}
	if b, err = r.br.Peek(h); err != nil {
		return err
	}
	switch n {
	case 126:
		n = int64(binary.BigEndian.Uint16(b[2:]))
	case 127:
		u := binary.BigEndian.Uint64(b[2:])
		if u>>63 != 0 {
			return fmt.Errorf("websocket: %w: bad frame length", ErrProtocol)
		}
		n = int64(u)
	}
	switch {
	case rsv != 0:
		return fmt.Errorf("websocket: %w: reserved bits set", ErrProtocol)
	case masked:
		return fmt.Errorf("websocket: %w: masked frame from server", ErrProtocol)
	}
	switch op {
	case opBinary, opContinuation:
		if (op == opBinary) == r.inMessage {
			return fmt.Errorf("websocket: %w: unexpected opcode %d in fragmented message", ErrProtocol, op)
		}
		r.br.Discard(h)
		r.inMessage = !fin
		r.remaining = n
		return nil
	case opText:
		return fmt.Errorf("websocket: %w: text frame (the protocol uses binary frames)", ErrProtocol)
	case opClose, opPing, opPong:
		if !fin || n > 125 {
			return fmt.Errorf("websocket: %w: bad control frame", ErrProtocol)
		}
	default:
		return fmt.Errorf("websocket: %w: unknown opcode %d", ErrProtocol, op)
	}
	frame, err := r.br.Peek(h + int(n))
	if err != nil {
		return err
	}
	payload := append([]byte(nil), frame[h:]...)
	r.br.Discard(h + int(n))
	switch op {
	case opPing:
		if err := r.conn.writeControl(opPong, payload); err != nil {
			return err
		}
	case opClose:
		ce := &CloseError{Code: 1005}
		if len(payload) >= 2 {
			ce.Code = int(binary.BigEndian.Uint16(payload))
			ce.Reason = string(payload[2:])
		}
		if len(payload) == 1 || !utf8.ValidString(ce.Reason) {
			return fmt.Errorf("websocket: %w: bad close frame", ErrProtocol)
		}
		r.conn.writeControl(opClose, payload[:min(2, len(payload))])
		return ce
	}
	return nil
}
