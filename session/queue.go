package session

import (
	"errors"
	"sync"

	"github.com/nanomesh/nanomesh/message"
)

// ErrQueueFull is returned by Enqueue when the session has too many messages
// waiting for their handlers.
var ErrQueueFull = errors.New("session: too many pending messages")

// Job is one inbound message waiting in a session's queue. Jobs come from a
// pool; Data is owned by the job until Free.
type Job struct {
	Msg  message.Message
	buf  []byte
	next *Job
}

var jobs = sync.Pool{New: func() any { return new(Job) }}

// NewJob returns a pooled job holding a copy of m (its Data is copied, so m
// may alias a read buffer).
func NewJob(m *message.Message) *Job {
	j := jobs.Get().(*Job)
	j.buf = append(j.buf[:0], m.Data...)
	j.Msg = *m
	j.Msg.Data = j.buf
	return j
}

// Detach hands the job's data to the caller, who may keep it; the job will
// not reuse that buffer.
func (j *Job) Detach() []byte {
	b := j.buf
	j.buf = nil
	return b
}

// Free returns the job to the pool.
func (j *Job) Free() {
	if cap(j.buf) > 64<<10 {
		j.buf = nil
	}
	j.Msg, j.next = message.Message{}, nil
	jobs.Put(j)
}

// queue is the session's FIFO of jobs, handled one at a time in arrival order
// by the dispatcher. An idle queue holds no memory beyond its fields.
type queue struct {
	mu      sync.Mutex
	head    *Job
	tail    *Job
	n       int32
	running bool
}

// Enqueue appends j to the session's queue, keeping at most max jobs waiting
// (no limit if max <= 0). It reports whether the queue was idle, in which
// case the caller must schedule the session and then drain it with Next.
func (s *Session) Enqueue(j *Job, max int) (schedule bool, err error) {
	q := &s.q
	q.mu.Lock()
	defer q.mu.Unlock()
	if max > 0 && int(q.n) >= max {
		return false, ErrQueueFull
	}
	if q.tail == nil {
		q.head = j
	} else {
		q.tail.next = j
	}
	q.tail = j
	q.n++
	if q.running {
		return false, nil
	}
	q.running = true
	return true, nil
}

// Next pops the next job. When the queue is empty it marks the session idle
// and returns nil; a later Enqueue then reports that it must be scheduled.
func (s *Session) Next() *Job {
	q := &s.q
	q.mu.Lock()
	j := q.head
	if j == nil {
		q.running = false
		q.mu.Unlock()
		return nil
	}
	q.head = j.next
	if q.head == nil {
		q.tail = nil
	}
	q.n--
	q.mu.Unlock()
	j.next = nil
	return j
}

// Pending returns the number of jobs waiting.
func (s *Session) Pending() int {
	s.q.mu.Lock()
	n := s.q.n
	s.q.mu.Unlock()
	return int(n)
}
