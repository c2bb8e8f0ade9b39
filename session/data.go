package session

import "maps"

// Set stores v under key in the session's data store.
func (s *Session) Set(key string, v any) {
	s.mu.Lock()
	if s.data == nil {
		s.data = make(map[string]any)
	}
	s.data[key] = v
	s.mu.Unlock()
}

// Get returns the value stored under key, or nil.
func (s *Session) Get(key string) any {
	s.mu.RLock()
	v := s.data[key]
	s.mu.RUnlock()
	return v
}

// Has reports whether a value is stored under key.
func (s *Session) Has(key string) bool {
	s.mu.RLock()
	_, ok := s.data[key]
	s.mu.RUnlock()
	return ok
}

// Remove deletes the value stored under key.
func (s *Session) Remove(key string) {
	s.mu.Lock()
	delete(s.data, key)
	s.mu.Unlock()
}

// Clear deletes every stored value.
func (s *Session) Clear() {
	s.mu.Lock()
	s.data = nil
	s.mu.Unlock()
}

// Data returns a copy of the data store.
func (s *Session) Data() map[string]any {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return maps.Clone(s.data)
}

// SetData replaces the data store with a copy of data.
func (s *Session) SetData(data map[string]any) {
	s.mu.Lock()
	s.data = maps.Clone(data)
	s.mu.Unlock()
}

// String returns the string stored under key, or "".
func (s *Session) String(key string) string { v, _ := s.Get(key).(string); return v }

// Bool returns the bool stored under key, or false.
func (s *Session) Bool(key string) bool { v, _ := s.Get(key).(bool); return v }

// Int returns the int stored under key, or 0. Other integer kinds and
// float64 (as decoded from JSON) are converted.
func (s *Session) Int(key string) int { return int(s.Int64(key)) }

// Int64 returns the integer stored under key, or 0. Other integer kinds and
// float64 (as decoded from JSON) are converted.
func (s *Session) Int64(key string) int64 {
	switch v := s.Get(key).(type) {
	case int:
		return int64(v)
	case int8:
		return int64(v)
	case int16:
		return int64(v)
	case int32:
		return int64(v)
	case int64:
		return v
	case uint:
		return int64(v)
	case uint8:
		return int64(v)
	case uint16:
		return int64(v)
	case uint32:
		return int64(v)
	case uint64:
		return int64(v)
	case float64:
		return int64(v)
	case float32:
		return int64(v)
	}
	return 0
}

// Float64 returns the number stored under key as a float64, or 0.
func (s *Session) Float64(key string) float64 {
	switch v := s.Get(key).(type) {
	case float64:
		return v
	case float32:
		return float64(v)
	case uint64: // not through Int64, which wraps values above MaxInt64
		return float64(v)
	case uint:
		return float64(v)
	}
	return float64(s.Int64(key))
}
