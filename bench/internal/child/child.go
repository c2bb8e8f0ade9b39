// Package child runs the benchmark's helper processes (load generators,
// servers) as re-executions of the current binary, and talks to them with
// JSON lines: the parent writes a config line and then commands on the
// child's stdin; the child writes typed messages on its stdout. A child exits
// when its stdin reaches EOF, so it never outlives the parent.
package child

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Msg is one line a child writes on stdout.
type Msg struct {
	Type string          `json:"type"`
	Data json.RawMessage `json:"data,omitempty"`
	T    int64           `json:"t"` // unix nanos when sent
}

// Proc is a running child process.
type Proc struct {
	Name  string
	cmd   *exec.Cmd
	stdin io.WriteCloser
	wmu   sync.Mutex

	mu     sync.Mutex
	queues map[string]chan Msg
	exited chan struct{}
	err    error
}

// Start re-executes the current binary as "self <sub> [args...]", sends cfg
// as the first line of its stdin, and returns once it runs. The child's
// stderr goes to logw.
func Start(name, sub string, cfg any, logw io.Writer, args ...string) (*Proc, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(exe, append([]string{sub}, args...)...)
	cmd.Stderr = logw
	cmd.Env = append(os.Environ(), "NANOMESH_BENCH_CHILD="+sub)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &Proc{Name: name, cmd: cmd, stdin: stdin, queues: map[string]chan Msg{}, exited: make(chan struct{})}
	go p.read(stdout)
	b, _ := json.Marshal(cfg)
	if err := p.send(string(b)); err != nil {
		p.Kill()
		return nil, err
	}
	return p, nil
}

// Pid returns the child's process id.
func (p *Proc) Pid() int { return p.cmd.Process.Pid }

func (p *Proc) queue(typ string) chan Msg {
	p.mu.Lock()
	defer p.mu.Unlock()
	q := p.queues[typ]
	if q == nil {
		q = make(chan Msg, 1<<14)
		p.queues[typ] = q
	}
	return q
}

func (p *Proc) read(r io.Reader) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 64<<20)
	for sc.Scan() {
		var m Msg
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil || m.Type == "" {
			fmt.Fprintf(os.Stderr, "[%s] %s\n", p.Name, sc.Text())
			continue
		}
		select {
		case p.queue(m.Type) <- m:
		default: // nobody reads this type: drop
		}
	}
	err := p.cmd.Wait()
	p.mu.Lock()
	p.err = err
	p.mu.Unlock()
	close(p.exited)
}

func (p *Proc) send(line string) error {
	p.wmu.Lock()
	defer p.wmu.Unlock()
	_, err := io.WriteString(p.stdin, line+"\n")
	return err
}

// Send writes a command line to the child.
func (p *Proc) Send(cmd string) error {
	if err := p.send(cmd); err != nil {
		return fmt.Errorf("%s: send %q: %w", p.Name, cmd, err)
	}
	return nil
}

// ErrExited is returned by Expect when the child has exited.
var ErrExited = errors.New("child exited")

// Expect waits for the next message of type typ and decodes its data into v
// (if v is not nil).
func (p *Proc) Expect(typ string, timeout time.Duration, v any) (Msg, error) {
	q := p.queue(typ)
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case m := <-q:
		if v != nil {
			if err := json.Unmarshal(m.Data, v); err != nil {
				return m, fmt.Errorf("%s: decode %s: %w", p.Name, typ, err)
			}
		}
		return m, nil
	case <-p.exited:
		// The message may have arrived just before the exit.
		select {
		case m := <-q:
			if v != nil {
				_ = json.Unmarshal(m.Data, v)
			}
			return m, nil
		default:
		}
		return Msg{}, fmt.Errorf("%s: waiting for %q: %w (%v)", p.Name, typ, ErrExited, p.Err())
	case <-t.C:
		return Msg{}, fmt.Errorf("%s: no %q message within %v", p.Name, typ, timeout)
	}
}

// Messages returns the channel of messages of type typ, for callers that
// consume a stream (progress, events).
func (p *Proc) Messages(typ string) <-chan Msg { return p.queue(typ) }

// Call sends cmd and waits for a reply of type typ.
func (p *Proc) Call(cmd, typ string, timeout time.Duration, v any) error {
	if err := p.Send(cmd); err != nil {
		return err
	}
	_, err := p.Expect(typ, timeout, v)
	return err
}

// Exited is closed when the child has exited.
func (p *Proc) Exited() <-chan struct{} { return p.exited }

// Err returns the child's exit error once it has exited.
func (p *Proc) Err() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.err
}

// Close closes the child's stdin (it exits on EOF) and waits up to timeout,
// then kills it.
func (p *Proc) Close(timeout time.Duration) error {
	p.wmu.Lock()
	_ = p.stdin.Close()
	p.wmu.Unlock()
	select {
	case <-p.exited:
		return nil
	case <-time.After(timeout):
		p.Kill()
		<-p.exited
		return fmt.Errorf("%s: killed after %v", p.Name, timeout)
	}
}

// Kill sends SIGKILL to the child.
func (p *Proc) Kill() {
	_ = p.cmd.Process.Signal(syscall.SIGKILL)
}

// Signal sends sig to the child.
func (p *Proc) Signal(sig os.Signal) error { return p.cmd.Process.Signal(sig) }

// --- child side ---

// Out writes typed JSON lines to stdout.
type Out struct {
	mu sync.Mutex
	w  *bufio.Writer
}

// NewOut returns a writer of messages to stdout.
func NewOut() *Out { return &Out{w: bufio.NewWriter(os.Stdout)} }

// Send writes one message.
func (o *Out) Send(typ string, v any) {
	var data json.RawMessage
	if v != nil {
		data, _ = json.Marshal(v)
	}
	b, _ := json.Marshal(Msg{Type: typ, Data: data, T: time.Now().UnixNano()})
	o.mu.Lock()
	o.w.Write(b)
	o.w.WriteByte('\n')
	o.w.Flush()
	o.mu.Unlock()
}

// ReadConfig reads the first stdin line into cfg and returns a channel of the
// following command lines, closed on EOF.
func ReadConfig(cfg any) (<-chan string, error) {
	r := bufio.NewReaderSize(os.Stdin, 1<<16)
	line, err := r.ReadString('\n')
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	if err := json.Unmarshal([]byte(line), cfg); err != nil {
		return nil, fmt.Errorf("decode config: %w", err)
	}
	cmds := make(chan string, 64)
	go func() {
		defer close(cmds)
		for {
			l, err := r.ReadString('\n')
			if l = strings.TrimSpace(l); l != "" {
				cmds <- l
			}
			if err != nil {
				return
			}
		}
	}()
	return cmds, nil
}

// --- /proc ---

// Stat is a process's resource usage read from /proc.
type Stat struct {
	RSSKiB  int64 // VmRSS
	HWMKiB  int64 // VmHWM, peak RSS
	Threads int64
	CPUTick int64 // utime + stime, in clock ticks
	FDs     int
}

// ClockTick is the kernel's USER_HZ (clock ticks per second), 100 on Linux.
const ClockTick = 100

// ReadStat reads /proc/<pid>/status and /proc/<pid>/stat.
func ReadStat(pid int) (Stat, error) {
	var s Stat
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return s, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) < 2 {
			continue
		}
		switch f[0] {
		case "VmRSS:":
			s.RSSKiB, _ = strconv.ParseInt(f[1], 10, 64)
		case "VmHWM:":
			s.HWMKiB, _ = strconv.ParseInt(f[1], 10, 64)
		case "Threads:":
			s.Threads, _ = strconv.ParseInt(f[1], 10, 64)
		}
	}
	b, err = os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return s, err
	}
	// The command name may hold spaces; fields start after the last ')'.
	str := string(b)
	if i := strings.LastIndexByte(str, ')'); i >= 0 {
		f := strings.Fields(str[i+1:])
		// f[0] is field 3 (state); utime is field 14, stime 15.
		if len(f) > 12 {
			u, _ := strconv.ParseInt(f[11], 10, 64)
			st, _ := strconv.ParseInt(f[12], 10, 64)
			s.CPUTick = u + st
		}
	}
	if ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid)); err == nil {
		s.FDs = len(ents)
	}
	return s, nil
}
