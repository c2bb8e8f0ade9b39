package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nanomesh/nanomesh/bench/internal/child"
	"github.com/nanomesh/nanomesh/bench/internal/loadgen"
	"github.com/nanomesh/nanomesh/bench/internal/report"
	"github.com/nanomesh/nanomesh/bench/internal/server"
)

// common holds the flags every scenario has.
type common struct {
	out      string
	baseline bool
	profile  bool
	childLog string
	quiet    bool
	settle   time.Duration
	debug    bool

	name    string
	cmdline string
	logw    io.Writer
	started time.Time
	version string // the code under test, taken when the run starts
}

func defaultOut() string {
	if st, err := os.Stat("bench"); err == nil && st.IsDir() {
		return filepath.Join("bench", "results")
	}
	return "results"
}

func (c *common) register(fs *flag.FlagSet) {
	fs.StringVar(&c.out, "out", defaultOut(), "directory for <scenario>.md, .json and .png results")
	fs.BoolVar(&c.baseline, "baseline", true, "also run the goroutine-per-connection baseline")
	fs.BoolVar(&c.profile, "profile", false, "save CPU and heap profiles of the server (pprof) under <out>/profiles")
	fs.StringVar(&c.childLog, "childlog", "", "file for the children's stderr (default: this process's stderr)")
	fs.BoolVar(&c.quiet, "q", false, "no progress lines on stderr")
	fs.BoolVar(&c.debug, "debug", false, "debug-level logs from nanomesh servers (to -childlog or stderr)")
	fs.DurationVar(&c.settle, "settle", 2*time.Second, "pause between phases (servers started, load stopped, sockets torn down)")
}

func (c *common) init(name string, args []string) error {
	c.name = name
	c.started = time.Now()
	c.version = codeVersion()
	c.cmdline = "go run ./bench " + name
	if len(args) > 0 {
		c.cmdline += " " + strings.Join(args, " ")
	}
	c.logw = os.Stderr
	if c.childLog != "" {
		f, err := os.Create(c.childLog)
		if err != nil {
			return err
		}
		c.logw = f
	}
	return os.MkdirAll(c.out, 0o755)
}

// progress prints a progress line on stderr.
func (c *common) progress(format string, args ...any) {
	if c.quiet {
		return
	}
	fmt.Fprintf(os.Stderr, "[%s %6.1fs] %s\n", c.name, time.Since(c.started).Seconds(), fmt.Sprintf(format, args...))
}

func (c *common) doc() *report.Doc {
	d := &report.Doc{Scenario: c.name, Command: c.cmdline, Date: c.started}
	if c.version != "" {
		d.Add("Code: %s (at the start of the run)\n", c.version)
	}
	return d
}

// codeVersion describes the checked-out commit and whether the tree has
// uncommitted changes outside bench/.
func codeVersion() string {
	out, err := exec.Command("git", "rev-parse", "--short", "HEAD").Output()
	if err != nil {
		return ""
	}
	v := "commit " + strings.TrimSpace(string(out))
	st, err := exec.Command("git", "status", "--porcelain").Output()
	if err == nil {
		dirs := map[string]bool{}
		for _, l := range strings.Split(string(st), "\n") {
			if len(l) < 4 {
				continue
			}
			p := strings.TrimSpace(l[3:])
			d, _, _ := strings.Cut(p, "/")
			if d != "bench" {
				dirs[d] = true
			}
		}
		if len(dirs) > 0 {
			var ds []string
			for d := range dirs {
				ds = append(ds, d)
			}
			v += fmt.Sprintf(" with uncommitted changes (%s)", strings.Join(sortStrings(ds), ", "))
		}
	}
	return v
}

func sortStrings(s []string) []string {
	for i := range s {
		for j := i + 1; j < len(s); j++ {
			if s[j] < s[i] {
				s[i], s[j] = s[j], s[i]
			}
		}
	}
	return s
}

func parseInts(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		n, err := strconv.Atoi(f)
		if err != nil {
			return nil, fmt.Errorf("bad number %q", f)
		}
		out = append(out, n)
	}
	return out, nil
}

func parseList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

// --- servers ---

type srvProc struct {
	*child.Proc
	cfg   server.Config
	ready server.Ready
}

func (c *common) startServer(name string, cfg server.Config) (*srvProc, error) {
	cfg.Debug = cfg.Debug || c.debug
	if c.profile && cfg.Pprof == "" {
		cfg.Pprof = "127.0.0.1:0"
	}
	p, err := child.Start(name, server.Sub, cfg, c.logw)
	if err != nil {
		return nil, err
	}
	s := &srvProc{Proc: p, cfg: cfg}
	if _, err := p.Expect("ready", 60*time.Second, &s.ready); err != nil {
		p.Kill()
		return nil, err
	}
	return s, nil
}

func (s *srvProc) stats() (server.Stats, error) {
	var st server.Stats
	err := s.Call("stats", "stats", 60*time.Second, &st)
	return st, err
}

func (s *srvProc) gcStats() (server.Stats, error) {
	var st server.Stats
	err := s.Call("gc", "stats", 120*time.Second, &st)
	return st, err
}

func (s *srvProc) proc() child.Stat {
	st, _ := child.ReadStat(s.Pid())
	return st
}

// quit shuts the server down gracefully, then reaps it.
func (s *srvProc) quit() {
	_ = s.Call("quit", "bye", 30*time.Second, nil)
	_ = s.Close(10 * time.Second)
}

// targets returns the client addresses of a server listening on addr
// (typically 0.0.0.0:port), spread over n loopback IPs 127.0.0.1..n.
func targets(addr string, n int) []string {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return []string{addr}
	}
	host, _, _ := net.SplitHostPort(addr)
	if ip := net.ParseIP(host); ip != nil && !ip.IsUnspecified() {
		return []string{addr}
	}
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("127.0.0.%d:%s", i+1, port)
	}
	return out
}

// sources returns n loopback source IPs for load generator shard i.
func sources(shard, n int) []string {
	out := make([]string, n)
	for k := range out {
		out[k] = fmt.Sprintf("127.%d.%d.%d", 1+shard/250, shard%250+1, k+1)
	}
	return out
}

// conntrack returns the kernel's connection-tracking table use, if any.
func conntrack() (count, limit int, ok bool) {
	read := func(name string) (int, bool) {
		b, err := os.ReadFile("/proc/sys/net/netfilter/" + name)
		if err != nil {
			return 0, false
		}
		n, err := strconv.Atoi(strings.TrimSpace(string(b)))
		return n, err == nil
	}
	count, ok1 := read("nf_conntrack_count")
	limit, ok2 := read("nf_conntrack_max")
	return count, limit, ok1 && ok2
}

// waitConntrack waits until the connection-tracking table has room for n
// more connections. Closed connections linger there (TIME_WAIT, 120 s by
// default); a full table silently drops SYNs, which shows up as connect
// timeouts and a collapsing connect rate in the next run.
func (c *common) waitConntrack(n int) {
	deadline := time.Now().Add(5 * time.Minute)
	for last := (time.Time{}); ; time.Sleep(time.Second) {
		count, limit, ok := conntrack()
		if !ok || count+n+n/5+1000 < limit || time.Now().After(deadline) {
			return
		}
		if time.Since(last) > 10*time.Second {
			last = time.Now()
			c.progress("waiting for the conntrack table to drain: %d of %d entries used, %d needed", count, limit, n)
		}
	}
}

// --- load generators ---

type lgProc struct {
	*child.Proc
	cfg   loadgen.Config
	ready loadgen.Ready
	prog  loadgen.Progress // the latest progress message
}

func (c *common) startLoadgen(name string, cfg loadgen.Config) (*lgProc, error) {
	p, err := child.Start(name, loadgen.Sub, cfg, c.logw)
	if err != nil {
		return nil, err
	}
	return &lgProc{Proc: p, cfg: cfg}, nil
}

// waitReady waits for every generator's "ready", printing progress.
func (c *common) waitReady(lgs []*lgProc, timeout time.Duration, what string, extra func() string) error {
	deadline := time.Now().Add(timeout)
	done := make([]bool, len(lgs))
	last := time.Now()
	for {
		all := true
		var ready, failed int64
		for i, l := range lgs {
			if !done[i] {
				select {
				case m := <-l.Messages("ready"):
					if err := json.Unmarshal(m.Data, &l.ready); err != nil {
						return err
					}
					done[i] = true
				case <-l.Exited():
					return fmt.Errorf("%s exited: %v", l.Name, l.Err())
				default:
				}
			}
			if done[i] {
				ready += l.ready.Ready
				failed += l.ready.Failed
				continue
			}
			all = false
			l.drainProgress()
			ready += l.prog.Ready
			failed += l.prog.Failed
		}
		if all {
			return nil
		}
		if time.Since(last) >= 2*time.Second {
			last = time.Now()
			x := ""
			if extra != nil {
				x = "  " + extra()
			}
			c.progress("%s: %d connected, %d failed%s", what, ready, failed, x)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: load generators not ready after %v", what, timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// drainProgress consumes pending progress messages, keeping the latest.
func (l *lgProc) drainProgress() {
	for {
		select {
		case m := <-l.Messages("progress"):
			_ = json.Unmarshal(m.Data, &l.prog)
		default:
			return
		}
	}
}

func closeAll[T interface{ Close(time.Duration) error }](ps []T) {
	var wg sync.WaitGroup
	for _, p := range ps {
		wg.Go(func() { _ = p.Close(30 * time.Second) })
	}
	wg.Wait()
}

// --- profiles ---

// fetchProfile saves http://<addr>/debug/pprof/<kind> to path.
func fetchProfile(ctx context.Context, addr, kind, path string) error {
	if addr == "" {
		return errors.New("no pprof address")
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/debug/pprof/"+kind, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("pprof %s: %s", kind, resp.Status)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = io.Copy(f, resp.Body)
	return err
}

// cpuProfile starts a CPU profile of secs seconds in the background; wait
// returns its error.
func (c *common) cpuProfile(s *srvProc, secs int, name string) (wait func()) {
	if !c.profile || s.ready.Pprof == "" {
		return func() {}
	}
	path := filepath.Join(c.out, "profiles", name+".cpu.pprof")
	done := make(chan struct{})
	go func() {
		defer close(done)
		ctx, cancel := context.WithTimeout(context.Background(), time.Duration(secs+30)*time.Second)
		defer cancel()
		if err := fetchProfile(ctx, s.ready.Pprof, fmt.Sprintf("profile?seconds=%d", secs), path); err != nil {
			c.progress("cpu profile %s: %v", name, err)
		} else {
			c.progress("cpu profile: %s", path)
		}
	}()
	return func() { <-done }
}

func (c *common) heapProfile(s *srvProc, name string) {
	if !c.profile || s.ready.Pprof == "" {
		return
	}
	path := filepath.Join(c.out, "profiles", name+".heap.pprof")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := fetchProfile(ctx, s.ready.Pprof, "heap", path); err != nil {
		c.progress("heap profile %s: %v", name, err)
	} else {
		c.progress("heap profile: %s", path)
	}
}

// cpuPercent converts clock ticks over d into percent of one core.
func cpuPercent(ticks int64, d time.Duration) float64 {
	if d <= 0 {
		return 0
	}
	return float64(ticks) / child.ClockTick / d.Seconds() * 100
}

func impls(baseline bool) []string {
	if baseline {
		return []string{server.Nanomesh, server.Baseline}
	}
	return []string{server.Nanomesh}
}

func fmtCounts(m map[string]int64) string {
	if len(m) == 0 {
		return "-"
	}
	var parts []string
	for k, v := range m {
		parts = append(parts, fmt.Sprintf("%s: %d", k, v))
	}
	return strings.Join(sortStrings(parts), "; ")
}

func readStat(pid int) (child.Stat, error) { return child.ReadStat(pid) }
