package main

import (
	"flag"
	"fmt"
	"path/filepath"
	"sync"
	"time"

	"github.com/nanomesh/nanomesh/bench/internal/child"
	"github.com/nanomesh/nanomesh/bench/internal/loadgen"
	"github.com/nanomesh/nanomesh/bench/internal/report"
	"github.com/nanomesh/nanomesh/bench/internal/server"
)

type connsGate struct {
	Pid              int     `json:"pid"`
	Sessions         int64   `json:"sessions"`
	RSSBeforeKiB     int64   `json:"rssBeforeKiB"`
	RSSAfterKiB      int64   `json:"rssAfterKiB"`
	RSSAfterGCKiB    int64   `json:"rssAfterGcKiB"`
	PeakRSSKiB       int64   `json:"peakRssKiB"`
	PerConnKiB       float64 `json:"perConnKiB"`
	GoroutinesBefore int     `json:"goroutinesBefore"`
	Goroutines       int     `json:"goroutines"`
	Threads          int64   `json:"threads"`
	HeapInuse        uint64  `json:"heapInuse"`
	StackInuse       uint64  `json:"stackInuse"`
	CPUPercent       float64 `json:"cpuPercent"`
}

type connsRun struct {
	Impl              string           `json:"impl"`
	Transport         string           `json:"transport"`
	Run               int              `json:"run"`
	N                 int              `json:"n"`
	Gates             int              `json:"gates"`
	Loadgens          int              `json:"loadgens"`
	HeartbeatSec      float64          `json:"heartbeatSec"`
	Ready             int64            `json:"ready"`
	Failed            int64            `json:"failed"`
	ConnectErrors     map[string]int64 `json:"connectErrors,omitempty"`
	ConnectSeconds    float64          `json:"connectSeconds"`
	ConnectRate       float64          `json:"connectRate"`
	ServerSessions    int64            `json:"serverSessions"`
	RSSBeforeKiB      int64            `json:"rssBeforeKiB"`
	RSSAfterKiB       int64            `json:"rssAfterKiB"`
	RSSAfterGCKiB     int64            `json:"rssAfterGcKiB"`
	PerConnKiB        float64          `json:"perConnKiB"`
	PerConnKiBAfterGC float64          `json:"perConnKiBAfterGc"`
	GoroutinesBefore  int              `json:"goroutinesBefore"`
	Goroutines        int              `json:"goroutines"`
	CPUPercent        float64          `json:"cpuPercent"` // sum over gates, percent of one core
	HoldSeconds       float64          `json:"holdSeconds"`
	HeartbeatsPerSec  float64          `json:"heartbeatsPerSec"` // received by the clients
	ClosedByServer    int64            `json:"closedByServer"`
	CloseReasons      map[string]int64 `json:"closeReasons,omitempty"`
	CloseAges         []string         `json:"closeAges,omitempty"` // seconds established / since the last server packet
	ProtocolErrors    map[string]int64 `json:"protocolErrors,omitempty"`
	Kicked            int64            `json:"kicked"`
	KickReasons       map[string]int64 `json:"kickReasons,omitempty"`
	ConnectCPUGates   float64          `json:"connectCpuGates"`    // percent of one core while connecting, all gates
	ConnectCPULoadgen float64          `json:"connectCpuLoadgens"` // same, all load generators
	LoadgenRSSKiB     int64            `json:"loadgenRssKiB"`
	LoadgenPerConnKiB float64          `json:"loadgenPerConnKiB"`
	ConntrackBefore   int              `json:"conntrackBefore,omitempty"` // nf_conntrack entries in use before the run
	ConntrackMax      int              `json:"conntrackMax,omitempty"`
	PerGate           []connsGate      `json:"perGate"`
	Samples           [][3]float64     `json:"samples"` // seconds, server sessions, total server RSS KiB
}

type connsOpts struct {
	common
	n          int
	gates      int
	loadgens   int
	transports string
	runs       int
	hold       time.Duration
	heartbeat  time.Duration
	inflight   int
	dests      int
	srcs       int
	pollers    int
}

func runConns(args []string) error {
	var o connsOpts
	fs := flag.NewFlagSet("conns", flag.ExitOnError)
	o.register(fs)
	fs.IntVar(&o.n, "n", 100000, "sessions to open (total over all gates)")
	fs.IntVar(&o.gates, "gates", 6, "server processes (gates); each holds n/gates connections")
	fs.IntVar(&o.loadgens, "loadgens", 6, "load generator processes; each holds n/loadgens connections")
	fs.StringVar(&o.transports, "transport", "ws,tcp", "transports to run, separately: ws, tcp")
	fs.IntVar(&o.runs, "runs", 1, "runs per implementation and transport (the summary shows medians)")
	fs.DurationVar(&o.hold, "hold", 10*time.Second, "idle window over which CPU is measured once all sessions are up")
	fs.DurationVar(&o.heartbeat, "heartbeat", 10*time.Second, "server heartbeat interval (clients answer each heartbeat)")
	fs.IntVar(&o.inflight, "inflight", 1024, "connects+handshakes in progress per load generator")
	fs.IntVar(&o.dests, "dests", 4, "destination loopback IPs per gate (127.0.0.1..n); gates listen on 0.0.0.0")
	fs.IntVar(&o.srcs, "srcs", 4, "source loopback IPs per load generator")
	fs.IntVar(&o.pollers, "pollers", 0, "nbio pollers per nanomesh gate (0: GOMAXPROCS)")
	_ = fs.Parse(args)
	if err := o.init("conns", args); err != nil {
		return err
	}
	if per := o.n/o.gates + 1; per > 19500 {
		return fmt.Errorf("%d connections per gate exceed the 20,000 open-file limit: use more -gates", per)
	}
	if per := o.n/o.loadgens + 1; per > 19500 {
		return fmt.Errorf("%d connections per load generator exceed the 20,000 open-file limit: use more -loadgens", per)
	}
	var runs []connsRun
	for _, tr := range parseList(o.transports) {
		for r := range o.runs {
			for _, impl := range impls(o.baseline) {
				res, err := o.one(impl, tr, r)
				if err != nil {
					return fmt.Errorf("%s %s run %d: %w", impl, tr, r+1, err)
				}
				runs = append(runs, res)
				time.Sleep(o.settle) // let the kernel tear the sockets down
			}
		}
	}
	return o.write(runs)
}

func (o *connsOpts) one(impl, tr string, run int) (connsRun, error) {
	tag := fmt.Sprintf("%s %s #%d", impl, tr, run+1)
	res := connsRun{Impl: impl, Transport: tr, Run: run + 1, N: o.n, Gates: o.gates, Loadgens: o.loadgens,
		HeartbeatSec: o.heartbeat.Seconds(), HoldSeconds: o.hold.Seconds()}
	o.waitConntrack(2 * o.n) // the clients' and the servers' ends may both be tracked
	if count, limit, ok := conntrack(); ok {
		res.ConntrackBefore, res.ConntrackMax = count, limit
	}
	o.progress("%s: starting %d gates", tag, o.gates)
	var gates []*srvProc
	defer func() {
		for _, g := range gates {
			g.Kill()
		}
	}()
	for g := range o.gates {
		cfg := server.Config{Impl: impl, Role: server.RoleSingle, Heartbeat: o.heartbeat, Pollers: o.pollers}
		if tr == "ws" {
			cfg.WS = "0.0.0.0:0"
		} else {
			cfg.TCP = "0.0.0.0:0"
		}
		s, err := o.startServer(fmt.Sprintf("gate-%d", g+1), cfg)
		if err != nil {
			return res, err
		}
		gates = append(gates, s)
	}
	time.Sleep(o.settle / 2)
	res.PerGate = make([]connsGate, len(gates))
	for i, g := range gates {
		st, err := g.stats()
		if err != nil {
			return res, err
		}
		ps := g.proc()
		res.PerGate[i] = connsGate{Pid: g.Pid(), RSSBeforeKiB: ps.RSSKiB, GoroutinesBefore: st.Goroutines}
		res.RSSBeforeKiB += ps.RSSKiB
		res.GoroutinesBefore += st.Goroutines
	}
	// Targets: conn i goes to gate i%G, on destination IP (i/G)%dests.
	var tgts []string
	for k := range o.dests {
		for _, g := range gates {
			addr := g.ready.TCP
			if tr == "ws" {
				addr = g.ready.WS
			}
			tgts = append(tgts, targets(addr, o.dests)[k])
		}
	}
	var lgs []*lgProc
	defer func() { closeAll(lgs) }()
	for l := range o.loadgens {
		n := o.n / o.loadgens
		if l < o.n%o.loadgens {
			n++
		}
		lg, err := o.startLoadgen(fmt.Sprintf("loadgen-%d", l+1), loadgen.Config{
			Shard: l, Mode: loadgen.ModeIdle, Transport: tr, Targets: tgts,
			Sources: sources(l, o.srcs), N: n, Inflight: o.inflight, Pollers: 1,
		})
		if err != nil {
			return res, err
		}
		lgs = append(lgs, lg)
	}
	// Sample server sessions and RSS while connecting.
	start := time.Now()
	var gcpu0, lcpu0 int64
	for _, g := range gates {
		gcpu0 += g.proc().CPUTick
	}
	for _, l := range lgs {
		lcpu0 += must(readStat(l.Pid())).CPUTick
	}
	res.Samples = append(res.Samples, [3]float64{0, 0, float64(res.RSSBeforeKiB)})
	var smu sync.Mutex
	sample := func() (sessions, rss int64) {
		for _, g := range gates {
			if st, err := g.stats(); err == nil {
				sessions += st.Sessions
			}
			rss += g.proc().RSSKiB
		}
		smu.Lock()
		res.Samples = append(res.Samples, [3]float64{time.Since(start).Seconds(), float64(sessions), float64(rss)})
		smu.Unlock()
		return
	}
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		t := time.NewTicker(500 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				sample()
			}
		}
	}()
	err := o.waitReady(lgs, 15*time.Minute, tag, func() string {
		smu.Lock()
		defer smu.Unlock()
		if len(res.Samples) == 0 {
			return ""
		}
		s := res.Samples[len(res.Samples)-1]
		return fmt.Sprintf("server sessions %.0f, RSS %s", s[1], report.MiB(int64(s[2])))
	})
	close(stop)
	<-sampled
	if err != nil {
		return res, err
	}
	var first, last int64
	res.ConnectErrors = map[string]int64{}
	for _, l := range lgs {
		res.Ready += l.ready.Ready
		res.Failed += l.ready.Failed
		for k, v := range l.ready.ConnectErrors {
			res.ConnectErrors[k] += v
		}
		if first == 0 || l.ready.StartNS < first {
			first = l.ready.StartNS
		}
		last = max(last, l.ready.EndNS)
	}
	res.ConnectSeconds = float64(last-first) / 1e9
	if res.ConnectSeconds > 0 {
		res.ConnectRate = float64(res.Ready) / res.ConnectSeconds
	}
	var gcpu1, lcpu1 int64
	for _, g := range gates {
		gcpu1 += g.proc().CPUTick
	}
	for _, l := range lgs {
		lcpu1 += must(readStat(l.Pid())).CPUTick
	}
	res.ConnectCPUGates = cpuPercent(gcpu1-gcpu0, time.Since(start))
	res.ConnectCPULoadgen = cpuPercent(lcpu1-lcpu0, time.Since(start))
	// Wait until the servers have established every session that is still
	// open (or the count stops moving).
	prev, still := int64(-1), 0
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(500 * time.Millisecond) {
		s, _ := sample()
		var dropped int64
		for _, l := range lgs {
			var c loadgen.Counters
			if err := l.Call("stats", "stats", 30*time.Second, &c); err == nil {
				dropped += c.ClosedByServer + c.Kicked
			}
		}
		if s == prev {
			still++
		} else {
			still = 0
		}
		prev = s
		if s >= res.Ready-dropped || still >= 6 || time.Now().After(deadline) {
			break
		}
	}
	o.progress("%s: %d sessions up in %.1fs (%.0f/s), %d failed; holding %v", tag, res.Ready, res.ConnectSeconds, res.ConnectRate, res.Failed, o.hold)
	time.Sleep(o.settle)
	// Idle window: CPU of each gate, heartbeats seen by the clients.
	hb0 := o.heartbeats(lgs)
	t0 := make([]child.Stat, len(gates))
	for i, g := range gates {
		t0[i] = g.proc()
	}
	w0 := time.Now()
	waitProf := o.cpuProfile(gates[0], int(o.hold.Seconds()), fmt.Sprintf("conns-%s-%s-idle", tr, impl))
	time.Sleep(o.hold)
	held := time.Since(w0)
	hb1 := o.heartbeats(lgs)
	res.HeartbeatsPerSec = float64(hb1-hb0) / held.Seconds()
	for i, g := range gates {
		ps := g.proc()
		pg := &res.PerGate[i]
		pg.CPUPercent = cpuPercent(ps.CPUTick-t0[i].CPUTick, held)
		pg.RSSAfterKiB, pg.PeakRSSKiB, pg.Threads = ps.RSSKiB, ps.HWMKiB, ps.Threads
		res.CPUPercent += pg.CPUPercent
		res.RSSAfterKiB += ps.RSSKiB
	}
	waitProf()
	o.heapProfile(gates[0], fmt.Sprintf("conns-%s-%s", tr, impl))
	for i, g := range gates {
		st, err := g.stats()
		if err != nil {
			return res, err
		}
		pg := &res.PerGate[i]
		pg.Sessions, pg.Goroutines, pg.HeapInuse, pg.StackInuse = st.Sessions, st.Goroutines, st.HeapInuse, st.StackInuse
		if st.Sessions > 0 {
			pg.PerConnKiB = float64(pg.RSSAfterKiB-pg.RSSBeforeKiB) / float64(st.Sessions)
		}
		res.ServerSessions += st.Sessions
		res.Goroutines += st.Goroutines
		if _, err := g.gcStats(); err != nil {
			return res, err
		}
		pg.RSSAfterGCKiB = g.proc().RSSKiB
		res.RSSAfterGCKiB += pg.RSSAfterGCKiB
	}
	if res.ServerSessions > 0 {
		res.PerConnKiB = float64(res.RSSAfterKiB-res.RSSBeforeKiB) / float64(res.ServerSessions)
		res.PerConnKiBAfterGC = float64(res.RSSAfterGCKiB-res.RSSBeforeKiB) / float64(res.ServerSessions)
	}
	for _, l := range lgs {
		var c loadgen.Counters
		if err := l.Call("stats", "stats", 30*time.Second, &c); err != nil {
			return res, err
		}
		res.ClosedByServer += c.ClosedByServer
		res.Kicked += c.Kicked
		res.CloseReasons = addCounts(res.CloseReasons, c.CloseReasons)
		res.CloseAges = append(res.CloseAges, c.CloseAges...)
		res.ProtocolErrors = addCounts(res.ProtocolErrors, c.ProtocolErrors)
		res.KickReasons = addCounts(res.KickReasons, c.KickReasons)
		res.LoadgenRSSKiB += must(child.ReadStat(l.Pid())).RSSKiB
	}
	if res.Ready > 0 {
		res.LoadgenPerConnKiB = float64(res.LoadgenRSSKiB) / float64(res.Ready)
	}
	o.progress("%s: server RSS %s -> %s (%.2f KiB/conn, %.2f after GC), %d goroutines, idle CPU %.1f%%, %.0f heartbeats/s",
		tag, report.MiB(res.RSSBeforeKiB), report.MiB(res.RSSAfterKiB), res.PerConnKiB, res.PerConnKiBAfterGC,
		res.Goroutines, res.CPUPercent, res.HeartbeatsPerSec)
	closeAll(lgs)
	lgs = nil
	var wg sync.WaitGroup
	for _, g := range gates {
		wg.Go(g.quit)
	}
	wg.Wait()
	gates = nil
	return res, nil
}

func must[T any](v T, _ error) T { return v }

func addCounts(dst, src map[string]int64) map[string]int64 {
	if len(src) == 0 {
		return dst
	}
	if dst == nil {
		dst = map[string]int64{}
	}
	for k, v := range src {
		dst[k] += v
	}
	return dst
}

func (o *connsOpts) heartbeats(lgs []*lgProc) int64 {
	var n int64
	for _, l := range lgs {
		var c loadgen.Counters
		if err := l.Call("stats", "stats", 30*time.Second, &c); err == nil {
			n += c.HeartbeatsRecv
		}
	}
	return n
}

func (o *connsOpts) write(runs []connsRun) error {
	d := o.doc()
	d.Add("Idle sessions: each client connects (%s), completes the handshake and answers every server heartbeat "+
		"(interval %v); nothing else is sent. Gates listen on 0.0.0.0 and clients dial 127.0.0.1..%d from %d source IPs "+
		"per load generator. RSS is VmRSS from /proc/<pid>/status: \"before\" with the gates started and idle, \"after\" "+
		"once all sessions are up and the %v idle window is over, \"after GC\" after runtime.GC + debug.FreeOSMemory. "+
		"Per connection = (after - before) / sessions. CPU is utime+stime from /proc/<pid>/stat over the idle window, "+
		"summed over the gates (100%% = one core). Values are medians over %d run(s).\n",
		o.transports, o.heartbeat, o.dests, o.srcs, o.hold, o.runs)
	t := &report.Table{Header: []string{"transport", "server", "sessions", "failed", "connect rate", "RSS before", "RSS after",
		"KiB/conn", "KiB/conn after GC", "goroutines", "idle CPU (all gates)", "heartbeats/s", "closed by server", "loadgen RSS/conn"}}
	type key struct{ tr, impl string }
	groups := map[key][]connsRun{}
	var order []key
	for _, r := range runs {
		k := key{r.Transport, r.Impl}
		if _, ok := groups[k]; !ok {
			order = append(order, k)
		}
		groups[k] = append(groups[k], r)
	}
	med := func(rs []connsRun, f func(connsRun) float64) float64 {
		xs := make([]float64, len(rs))
		for i, r := range rs {
			xs[i] = f(r)
		}
		return report.Median(xs)
	}
	summary := map[string]map[string]float64{}
	for _, k := range order {
		rs := groups[k]
		m := map[string]float64{
			"sessions":          med(rs, func(r connsRun) float64 { return float64(r.ServerSessions) }),
			"failed":            med(rs, func(r connsRun) float64 { return float64(r.Failed) }),
			"connectRate":       med(rs, func(r connsRun) float64 { return r.ConnectRate }),
			"rssBeforeKiB":      med(rs, func(r connsRun) float64 { return float64(r.RSSBeforeKiB) }),
			"rssAfterKiB":       med(rs, func(r connsRun) float64 { return float64(r.RSSAfterKiB) }),
			"perConnKiB":        med(rs, func(r connsRun) float64 { return r.PerConnKiB }),
			"perConnKiBAfterGc": med(rs, func(r connsRun) float64 { return r.PerConnKiBAfterGC }),
			"goroutines":        med(rs, func(r connsRun) float64 { return float64(r.Goroutines) }),
			"cpuPercent":        med(rs, func(r connsRun) float64 { return r.CPUPercent }),
			"heartbeatsPerSec":  med(rs, func(r connsRun) float64 { return r.HeartbeatsPerSec }),
			"closedByServer":    med(rs, func(r connsRun) float64 { return float64(r.ClosedByServer) }),
			"loadgenPerConnKiB": med(rs, func(r connsRun) float64 { return r.LoadgenPerConnKiB }),
		}
		summary[k.tr+"/"+k.impl] = m
		t.Add(k.tr, k.impl, fmt.Sprintf("%.0f", m["sessions"]), fmt.Sprintf("%.0f", m["failed"]),
			fmt.Sprintf("%.0f/s", m["connectRate"]), report.MiB(int64(m["rssBeforeKiB"])), report.MiB(int64(m["rssAfterKiB"])),
			fmt.Sprintf("%.2f", m["perConnKiB"]), fmt.Sprintf("%.2f", m["perConnKiBAfterGc"]), fmt.Sprintf("%.0f", m["goroutines"]),
			fmt.Sprintf("%.1f%%", m["cpuPercent"]), fmt.Sprintf("%.0f", m["heartbeatsPerSec"]),
			fmt.Sprintf("%.0f", m["closedByServer"]), fmt.Sprintf("%.2f KiB", m["loadgenPerConnKiB"]))
	}
	t.Title = "Summary"
	d.AddTable(t)
	// Target check.
	for _, tr := range parseList(o.transports) {
		nm, ok := summary[tr+"/"+server.Nanomesh]
		if !ok {
			continue
		}
		line := fmt.Sprintf("- %s: nanomesh %.2f KiB/session", tr, nm["perConnKiB"])
		if b, ok := summary[tr+"/"+server.Baseline]; ok && nm["perConnKiB"] > 0 {
			line += fmt.Sprintf(", baseline %.2f KiB/session (%.1fx)", b["perConnKiB"], b["perConnKiB"]/nm["perConnKiB"])
		}
		if tr == "ws" {
			verdict := "met"
			if nm["perConnKiB"] > 2 {
				verdict = "NOT met"
			}
			line += fmt.Sprintf("; target <= 2 KiB per WebSocket session: %s", verdict)
		}
		d.Add("%s\n", line)
	}
	d.Add("\n")
	// Per-process table of the last run of each group.
	for _, k := range order {
		rs := groups[k]
		r := rs[len(rs)-1]
		pt := &report.Table{Title: fmt.Sprintf("Per gate process: %s %s (run %d)", k.tr, k.impl, r.Run),
			Header: []string{"gate", "pid", "sessions", "RSS before", "RSS after", "RSS after GC", "peak RSS", "KiB/conn",
				"goroutines", "threads", "heap in use", "stacks", "idle CPU"}}
		for i, g := range r.PerGate {
			pt.Add(i+1, g.Pid, g.Sessions, report.MiB(g.RSSBeforeKiB), report.MiB(g.RSSAfterKiB), report.MiB(g.RSSAfterGCKiB),
				report.MiB(g.PeakRSSKiB), fmt.Sprintf("%.2f", g.PerConnKiB), g.Goroutines, g.Threads,
				report.MiB(int64(g.HeapInuse/1024)), report.MiB(int64(g.StackInuse/1024)), fmt.Sprintf("%.1f%%", g.CPUPercent))
		}
		pt.Add("total", "", r.ServerSessions, report.MiB(r.RSSBeforeKiB), report.MiB(r.RSSAfterKiB), report.MiB(r.RSSAfterGCKiB),
			"", fmt.Sprintf("%.2f", r.PerConnKiB), r.Goroutines, "", "", "", fmt.Sprintf("%.1f%%", r.CPUPercent))
		d.AddTable(pt)
		d.Add("CPU while connecting (%s %s): gates %.0f%%, load generators %.0f%% (100%% = one core).\n",
			k.tr, k.impl, r.ConnectCPUGates, r.ConnectCPULoadgen)
		if len(r.ConnectErrors) > 0 {
			d.Add("Connect errors (%s %s): %s\n", k.tr, k.impl, fmtCounts(r.ConnectErrors))
		}
		if r.ClosedByServer+r.Kicked > 0 || len(r.ProtocolErrors) > 0 {
			d.Add("Sessions lost after connecting (%s %s): closed by the server %d (%s), kicked %d (%s), client protocol errors: %s\n",
				k.tr, k.impl, r.ClosedByServer, fmtCounts(r.CloseReasons), r.Kicked, fmtCounts(r.KickReasons), fmtCounts(r.ProtocolErrors))
		}
	}
	// Memory vs connections.
	var series []report.Series
	for _, k := range order {
		r := groups[k][0]
		s := report.Series{Name: k.impl + " " + k.tr}
		for _, p := range r.Samples {
			s.X = append(s.X, p[1])
			s.Y = append(s.Y, p[2]/1024)
		}
		series = append(series, s)
	}
	png := filepath.Join(o.out, "conns-memory.png")
	if err := report.LinePlot(png, report.PlotOpts{Title: fmt.Sprintf("Server RSS vs sessions (sum over %d gate processes)", o.gates),
		X: "established sessions", Y: "server RSS (MiB)", Points: true, YFrom0: true}, series); err != nil {
		return err
	}
	d.Add("![memory vs connections](conns-memory.png)\n")
	if err := report.Write(o.out, "conns", d, struct {
		Summary map[string]map[string]float64 `json:"summary"`
		Runs    []connsRun                    `json:"runs"`
	}{summary, runs}); err != nil {
		return err
	}
	fmt.Print(d.Markdown())
	return nil
}
