package message

import "fmt"

// Dictionary maps routes to 2-byte codes for route compression, and interns
// the known routes so that decoding a plain route does not allocate. It is
// immutable after NewDictionary and safe for concurrent use. A nil
// *Dictionary is valid and empty.
type Dictionary struct {
	codes  map[string]uint16
	routes map[uint16]string
	names  map[string]string
}

// NewDictionary builds a dictionary from route codes and a list of further
// known routes (which are interned but not compressed). Duplicate codes and
// routes longer than MaxRouteLen are errors.
func NewDictionary(codes map[string]uint16, known ...string) (*Dictionary, error) {
	d := &Dictionary{
		codes:  make(map[string]uint16, len(codes)),
		routes: make(map[uint16]string, len(codes)),
		names:  make(map[string]string, len(codes)+len(known)),
	}
	for r, c := range codes {
		if len(r) > MaxRouteLen {
			return nil, fmt.Errorf("%w: %q", ErrRouteTooLong, r)
		}
		if other, dup := d.routes[c]; dup {
			return nil, fmt.Errorf("message: routes %q and %q share code %d", other, r, c)
		}
		d.codes[r], d.routes[c], d.names[r] = c, r, r
	}
	for _, r := range known {
		if len(r) > MaxRouteLen {
			return nil, fmt.Errorf("%w: %q", ErrRouteTooLong, r)
		}
		d.names[r] = r
	}
	return d, nil
}

// Code returns the code of route, if it has one.
func (d *Dictionary) Code(route string) (uint16, bool) {
	if d == nil || len(d.codes) == 0 {
		return 0, false
	}
	c, ok := d.codes[route]
	return c, ok
}

// Route returns the route of code, if known.
func (d *Dictionary) Route(code uint16) (string, bool) {
	if d == nil {
		return "", false
	}
	r, ok := d.routes[code]
	return r, ok
}

// Codes returns a copy of the route-to-code map, as sent in the handshake.
func (d *Dictionary) Codes() map[string]uint16 {
	if d == nil {
		return nil
	}
	m := make(map[string]uint16, len(d.codes))
	for r, c := range d.codes {
		m[r] = c
	}
	return m
}

// Len returns the number of compressed routes.
func (d *Dictionary) Len() int {
	if d == nil {
		return 0
	}
	return len(d.codes)
}

func (d *Dictionary) intern(b []byte) string {
	if d != nil {
		if s, ok := d.names[string(b)]; ok {
			return s
		}
	}
	return string(b)
}
