package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nanomesh/nanomesh/discovery"
	"github.com/nanomesh/nanomesh/examples/cluster/internal/check"
)

func TestOldest(t *testing.T) {
	t0 := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	m := func(id string, started time.Duration) *discovery.Member {
		return &discovery.Member{ID: id, StartedAt: t0.Add(started)}
	}
	r := Oldest()
	for _, tc := range []struct {
		ms   []*discovery.Member
		want string
	}{
		{[]*discovery.Member{m("chat-1", 0)}, "chat-1"},
		{[]*discovery.Member{m("chat-1", time.Second), m("chat-2", 0)}, "chat-2"},       // chat-1 restarted
		{[]*discovery.Member{m("chat-1", 0), m("chat-2", 0), m("chat-3", 0)}, "chat-1"}, // tie: lowest id
		{[]*discovery.Member{m("a", 2), m("b", 1), m("c", 3)}, "b"},
	} {
		if got := r(nil, "room", tc.ms).ID; got != tc.want {
			t.Errorf("Oldest(%v) = %s, want %s", ids(tc.ms), got, tc.want)
		}
	}
}

func ids(ms []*discovery.Member) []string {
	var out []string
	for _, m := range ms {
		out = append(out, m.ID)
	}
	return out
}

func TestAdvertise(t *testing.T) {
	host, _ := os.Hostname()
	for _, tc := range []struct {
		grpc, adv, want string
		err             bool
	}{
		{"127.0.0.1:0", "", "", false},
		{"127.0.0.1:4250", "", "", false},
		{"0.0.0.0:4250", "chat-1:4250", "chat-1:4250", false},
		{":4250", "", host + ":4250", false},
		{"0.0.0.0:4250", "", host + ":4250", false},
		{":0", "", "", true},
		{"nonsense", "", "", true},
	} {
		got, err := advertise(config{grpc: tc.grpc, advertise: tc.adv})
		if (err != nil) != tc.err || got != tc.want {
			t.Errorf("advertise(-grpc %q -advertise %q) = %q, %v; want %q, error %v", tc.grpc, tc.adv, got, err, tc.want, tc.err)
		}
	}
}

// TestMultiProcess runs the cluster as separate processes of the real
// binary: etcd, two chat nodes and a gate. Users chat through the gate; the
// chat node serving the room is SIGKILLed; new users still chat (on the
// other chat node) and the gate drops the dead node once its lease expires.
// Then every process exits cleanly on SIGTERM.
func TestMultiProcess(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	bin := buildBinary(t)
	const ttl = 2 * time.Second

	etcd := startProc(t, bin, "etcd", "-role", "etcd", "-etcd", "127.0.0.1:0", "-etcd-dir", t.TempDir(), "-json")
	ep := etcd.waitLog(t, "etcd ready", 30*time.Second)["endpoint"].(string)
	common := []string{"-etcd", ep, "-etcd-prefix", "/mp-test", "-ttl", ttl.String(), "-json", "-grpc", "127.0.0.1:0"}

	// chat-1 registers first, so it is the oldest and serves the room.
	chat1 := startProc(t, bin, "chat-1", append([]string{"-role", "chat", "-id", "chat-1"}, common...)...)
	chat1.waitLog(t, "registered and routable", 20*time.Second)
	chat2 := startProc(t, bin, "chat-2", append([]string{"-role", "chat", "-id", "chat-2"}, common...)...)
	chat2.waitLog(t, "registered and routable", 20*time.Second)
	gate := startProc(t, bin, "gate-1", append([]string{"-role", "gate", "-id", "gate-1",
		"-ws", "127.0.0.1:0", "-tcp", "127.0.0.1:0"}, common...)...)
	gate.waitLog(t, "chat page", 20*time.Second)
	tcp := "tcp://" + gate.waitLog(t, "tcp listener ready", 0)["addr"].(string)
	wsHost := gate.waitLog(t, "websocket listener ready", 0)["addr"].(string)
	ws := "ws://" + wsHost + "/nano"
	base := "http://" + wsHost

	if tb := clusterTable(t, base); tb.Room != "chat-1" || len(tb.Members) != 3 {
		t.Fatalf("gate table before the crash: %+v", tb)
	}
	for _, addr := range []string{tcp, ws} {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		r, err := check.Until(ctx, addr, 5*time.Second, 50*time.Millisecond)
		cancel()
		if err != nil {
			t.Fatalf("chat via %s: %v", addr, err)
		}
		t.Logf("chat via %s: broadcast in %v", addr, r.Broadcast)
	}

	// Crash the room's node: no deregistration, its lease has to expire.
	killed := time.Now()
	if err := chat1.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	r, err := check.Until(ctx, tcp, 3*time.Second, 20*time.Millisecond)
	cancel()
	if err != nil {
		t.Fatalf("chat after SIGKILL of chat-1: %v", err)
	}
	t.Logf("SIGKILL chat-1 -> first successful join+broadcast: %v (%d tries)", time.Since(killed), r.Attempts)

	var removed time.Duration
	deadline := time.Now().Add(4*ttl + 5*time.Second)
	for {
		tb := clusterTable(t, base)
		if !tb.has("chat-1") {
			removed = time.Since(killed)
			if tb.Room != "chat-2" {
				t.Fatalf("room not on chat-2 after chat-1 left: %+v", tb)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("gate still lists chat-1 %v after SIGKILL (TTL %v)", time.Since(killed), ttl)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("SIGKILL chat-1 -> gone from the gate's table: %v (lease TTL %v)", removed, ttl)

	// After the lease expired: new joins work and messages are broadcast.
	for _, addr := range []string{tcp, ws} {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		r, err := check.Chat(ctx, addr)
		cancel()
		if err != nil {
			t.Fatalf("chat via %s after chat-1 expired: %v", addr, err)
		}
		t.Logf("chat via %s after expiry: broadcast in %v", addr, r.Broadcast)
	}

	// Graceful shutdown: every process exits 0 on SIGTERM.
	for _, p := range []*proc{gate, chat2, etcd} {
		start := time.Now()
		if err := p.stop(syscall.SIGTERM, 20*time.Second); err != nil {
			t.Fatalf("%s: %v", p.name, err)
		}
		t.Logf("%s exited cleanly %v after SIGTERM", p.name, time.Since(start))
	}
}

// buildBinary builds this command into a temporary directory.
func buildBinary(t *testing.T) string {
	t.Helper()
	gotool, err := exec.LookPath("go")
	if err != nil {
		gotool = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	bin := filepath.Join(t.TempDir(), "cluster")
	start := time.Now()
	args := []string{"build", "-o", bin}
	if raceEnabled {
		args = append(args, "-race")
	}
	cmd := exec.Command(gotool, append(args, ".")...)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	t.Logf("built %s in %v", bin, time.Since(start))
	return bin
}

// proc is one process of the cluster, its JSON log lines collected.
type proc struct {
	name string
	cmd  *exec.Cmd
	done chan struct{} // closed when the process has exited

	mu      sync.Mutex
	lines   []map[string]any
	raw     []string
	changed chan struct{} // closed and replaced on every new line
	err     error         // Wait's result
}

func startProc(t *testing.T, bin, name string, args ...string) *proc {
	t.Helper()
	p := &proc{name: name, cmd: exec.Command(bin, args...), done: make(chan struct{}), changed: make(chan struct{})}
	// A -race binary exits with status 66 on a race; skip its 1 s exit pause.
	p.cmd.Env = append(os.Environ(), "GORACE="+strings.TrimSpace(os.Getenv("GORACE")+" atexit_sleep_ms=0"))
	stderr, err := p.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			var m map[string]any
			_ = json.Unmarshal(sc.Bytes(), &m)
			p.mu.Lock()
			p.raw = append(p.raw, sc.Text())
			if m != nil {
				p.lines = append(p.lines, m)
			}
			close(p.changed)
			p.changed = make(chan struct{})
			p.mu.Unlock()
		}
		err := p.cmd.Wait()
		p.mu.Lock()
		p.err = err
		p.mu.Unlock()
		close(p.done)
	}()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			_ = p.cmd.Process.Kill()
			<-p.done
		}
		if t.Failed() {
			p.mu.Lock()
			t.Logf("--- %s log:\n%s", p.name, strings.Join(p.raw, "\n"))
			p.mu.Unlock()
		}
	})
	return p
}

// waitLog returns the first log line whose message is msg, waiting up to
// timeout for it (0: it must be there already).
func (p *proc) waitLog(t *testing.T, msg string, timeout time.Duration) map[string]any {
	t.Helper()
	deadline := time.After(timeout)
	for {
		p.mu.Lock()
		for _, l := range p.lines {
			if l["message"] == msg {
				p.mu.Unlock()
				return l
			}
		}
		changed := p.changed
		p.mu.Unlock()
		if timeout == 0 {
			t.Fatalf("%s has not logged %q", p.name, msg)
		}
		select {
		case <-changed:
		case <-p.done:
			t.Fatalf("%s exited (%v) before logging %q", p.name, p.err, msg)
		case <-deadline:
			t.Fatalf("%s did not log %q within %v", p.name, msg, timeout)
		}
	}
}

// stop signals the process and waits for it to exit with status 0.
func (p *proc) stop(sig os.Signal, timeout time.Duration) error {
	if err := p.cmd.Process.Signal(sig); err != nil {
		return err
	}
	select {
	case <-p.done:
	case <-time.After(timeout):
		return fmt.Errorf("still running %v after %v", timeout, sig)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.err != nil {
		return fmt.Errorf("exit after %v: %v", sig, p.err)
	}
	return nil
}

type clusterView struct {
	Room    string `json:"room"`
	Members []struct {
		ID string `json:"id"`
	} `json:"members"`
}

func (v *clusterView) has(id string) bool {
	for _, m := range v.Members {
		if m.ID == id {
			return true
		}
	}
	return false
}

// clusterTable reads the gate's member table from GET /cluster.
func clusterTable(t *testing.T, base string) *clusterView {
	t.Helper()
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get(base + "/cluster")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var v clusterView
	if err := json.NewDecoder(resp.Body).Decode(&v); err != nil {
		t.Fatal(err)
	}
	return &v
}
