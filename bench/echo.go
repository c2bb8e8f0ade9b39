package main

import (
	"flag"
	"fmt"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/nanomesh/nanomesh/bench/internal/hist"
	"github.com/nanomesh/nanomesh/bench/internal/loadgen"
	"github.com/nanomesh/nanomesh/bench/internal/report"
)

type echoPoint struct {
	Mode       string           `json:"mode"`
	Impl       string           `json:"impl"`
	C          int              `json:"c"`
	Run        int              `json:"run"`
	Requests   int64            `json:"requests"`
	Seconds    float64          `json:"seconds"`
	Throughput float64          `json:"throughput"` // responses per second
	P50        int64            `json:"p50Ns"`
	P99        int64            `json:"p99Ns"`
	P999       int64            `json:"p999Ns"`
	Mean       float64          `json:"meanNs"`
	Max        int64            `json:"maxNs"`
	Errors     int64            `json:"errors"`
	ErrorCodes map[string]int64 `json:"errorCodes,omitempty"`
	Timeouts   int64            `json:"timeouts"`
	ServerCPU  float64          `json:"serverCpuPercent"` // all server processes, 100 = one core
	ClientCPU  float64          `json:"clientCpuPercent"`
	Latency    hist.Snapshot    `json:"latency"`
}

type echoOpts struct {
	common
	cs        string
	modes     string
	transport string
	duration  time.Duration
	warmup    time.Duration
	runs      int
	payload   int
	lgPollers int
	latC      int
}

func runEcho(args []string) error {
	var o echoOpts
	fs := flag.NewFlagSet("echo", flag.ExitOnError)
	o.register(fs)
	fs.StringVar(&o.cs, "c", "1,10,100,500", "concurrent clients (closed loop: one request in flight each), comma-separated")
	fs.StringVar(&o.modes, "modes", "local,cluster", "local: handler on the node holding the client; cluster: gate -> backend over gRPC")
	fs.StringVar(&o.transport, "transport", "tcp", "client transport: tcp or ws")
	fs.DurationVar(&o.duration, "duration", 10*time.Second, "measurement window per point")
	fs.DurationVar(&o.warmup, "warmup", 2*time.Second, "warm-up before each window")
	fs.IntVar(&o.runs, "runs", 3, "runs per point (tables show medians)")
	fs.IntVar(&o.payload, "payload", 64, "approximate request body size in bytes (a JSON {\"msg\":...})")
	fs.IntVar(&o.lgPollers, "lgpollers", 1, "event-loop goroutines of the load generator")
	fs.IntVar(&o.latC, "latc", 100, "concurrency whose latency distribution is plotted (largest if absent)")
	_ = fs.Parse(args)
	if err := o.init("echo", args); err != nil {
		return err
	}
	cs, err := parseInts(o.cs)
	if err != nil {
		return err
	}
	pad := max(o.payload-len(`{"msg":""}`), 1)
	payload := `{"msg":"` + strings.Repeat("x", pad) + `"}`
	var etcd etcdOnce
	defer etcd.close()
	var points []echoPoint
	for _, mode := range parseList(o.modes) {
		for _, impl := range impls(o.baseline) {
			tag := impl + " " + mode
			o.progress("%s: starting servers", tag)
			topo, err := o.startTopology(&etcd, impl, mode, o.transport, 1, 30*time.Second)
			if err != nil {
				return fmt.Errorf("%s: %w", tag, err)
			}
			for _, c := range cs {
				for r := range o.runs {
					profile := r == 0 && c == cs[len(cs)-1]
					p, err := o.point(topo, impl, mode, c, r, payload, profile)
					if err != nil {
						topo.kill()
						return fmt.Errorf("%s c=%d: %w", tag, c, err)
					}
					o.progress("%s c=%d run %d: %.0f req/s, p50 %s p99 %s p999 %s, errors %d, timeouts %d, server CPU %.0f%%",
						tag, c, r+1, p.Throughput, report.Ms(p.P50), report.Ms(p.P99), report.Ms(p.P999), p.Errors, p.Timeouts, p.ServerCPU)
					points = append(points, p)
				}
			}
			topo.stop()
		}
	}
	return o.write(points, cs)
}

func (o *echoOpts) point(topo *topology, impl, mode string, c, run int, payload string, profile bool) (echoPoint, error) {
	p := echoPoint{Mode: mode, Impl: impl, C: c, Run: run + 1}
	g := topo.gates[0]
	addr := g.ready.TCP
	if o.transport == "ws" {
		addr = g.ready.WS
	}
	lg, err := o.startLoadgen("loadgen", loadgen.Config{
		Mode: loadgen.ModeEcho, Transport: o.transport, Targets: targets(addr, 4), Sources: sources(0, 4),
		N: c, Pollers: o.lgPollers, Route: "bench.echo", Payload: payload,
	})
	if err != nil {
		return p, err
	}
	defer lg.Close(30 * time.Second)
	if err := o.waitReady([]*lgProc{lg}, 2*time.Minute, "echo connect", nil); err != nil {
		return p, err
	}
	if lg.ready.Failed > 0 {
		return p, fmt.Errorf("%d clients failed to connect: %s", lg.ready.Failed, fmtCounts(lg.ready.ConnectErrors))
	}
	if err := lg.Send("start"); err != nil {
		return p, err
	}
	time.Sleep(o.warmup)
	waits := []func(){}
	if profile {
		for _, s := range topo.all {
			waits = append(waits, o.cpuProfile(s, int(o.duration.Seconds()), fmt.Sprintf("echo-%s-%s-%s-c%d", mode, impl, strings.TrimPrefix(s.Name, impl+"-"), c)))
		}
	}
	if err := lg.Send("measure"); err != nil {
		return p, err
	}
	s0, c0, t0 := topo.cpuTicks(), must(readStat(lg.Pid())).CPUTick, time.Now()
	time.Sleep(o.duration)
	var res loadgen.Result
	if err := lg.Call("stop", "result", time.Minute, &res); err != nil {
		return p, err
	}
	el := time.Since(t0)
	p.ServerCPU = cpuPercent(topo.cpuTicks()-s0, el)
	p.ClientCPU = cpuPercent(must(readStat(lg.Pid())).CPUTick-c0, el)
	for _, w := range waits {
		w()
	}
	p.Requests = res.Responses
	p.Seconds = float64(res.MeasureNS) / 1e9
	if p.Seconds > 0 {
		p.Throughput = float64(p.Requests) / p.Seconds
	}
	p.Latency = res.Latency
	p.P50, p.P99, p.P999 = res.Latency.Quantile(0.5), res.Latency.Quantile(0.99), res.Latency.Quantile(0.999)
	p.Mean, p.Max = res.Latency.Mean(), res.Latency.Max
	p.Errors, p.ErrorCodes, p.Timeouts = res.ErrorResponses, res.ErrorCodes, res.Timeouts
	return p, nil
}

type echoSummary struct {
	Mode       string  `json:"mode"`
	Impl       string  `json:"impl"`
	C          int     `json:"c"`
	Throughput float64 `json:"throughput"`
	P50        float64 `json:"p50Ns"`
	P99        float64 `json:"p99Ns"`
	P999       float64 `json:"p999Ns"`
	ServerCPU  float64 `json:"serverCpuPercent"`
	Errors     int64   `json:"errors"`
	Timeouts   int64   `json:"timeouts"`
	Runs       int     `json:"runs"`
}

func summarizeEcho(points []echoPoint) map[string]*echoSummary {
	groups := map[string][]echoPoint{}
	for _, p := range points {
		k := fmt.Sprintf("%s/%s/%d", p.Mode, p.Impl, p.C)
		groups[k] = append(groups[k], p)
	}
	out := map[string]*echoSummary{}
	for k, ps := range groups {
		med := func(f func(echoPoint) float64) float64 {
			xs := make([]float64, len(ps))
			for i, p := range ps {
				xs[i] = f(p)
			}
			return report.Median(xs)
		}
		s := &echoSummary{Mode: ps[0].Mode, Impl: ps[0].Impl, C: ps[0].C, Runs: len(ps),
			Throughput: med(func(p echoPoint) float64 { return p.Throughput }),
			P50:        med(func(p echoPoint) float64 { return float64(p.P50) }),
			P99:        med(func(p echoPoint) float64 { return float64(p.P99) }),
			P999:       med(func(p echoPoint) float64 { return float64(p.P999) }),
			ServerCPU:  med(func(p echoPoint) float64 { return p.ServerCPU }),
		}
		for _, p := range ps {
			s.Errors += p.Errors
			s.Timeouts += p.Timeouts
		}
		out[k] = s
	}
	return out
}

func (o *echoOpts) write(points []echoPoint, cs []int) error {
	sum := summarizeEcho(points)
	d := o.doc()
	d.Add("Closed loop: C clients over %s, each with one request in flight (%d-byte JSON body to `bench.echo`, "+
		"decoded into a struct and encoded back by the handler). local = handler on the node that holds the "+
		"connection; cluster = a gate forwards to a backend process over gRPC (nanomesh: etcd discovery + its "+
		"gRPC stream; baseline: one unary gRPC call per request, static address). Each point: %v warm-up, %v "+
		"measured, median of %d run(s). Latency is measured by the load generator (send to response). Server CPU "+
		"is all server processes over the window (100%% = one core); the load generator shares the same 2 cores.\n",
		o.transport, o.payload, o.warmup, o.duration, o.runs)
	modes := parseList(o.modes)
	for _, mode := range modes {
		t := &report.Table{Title: "Mode: " + mode, Header: []string{"C", "nanomesh req/s", "baseline req/s", "ratio",
			"nanomesh p50 / p99 / p999", "baseline p50 / p99 / p999", "server CPU n / b", "errors+timeouts n / b"}}
		for _, c := range cs {
			n := sum[fmt.Sprintf("%s/nanomesh/%d", mode, c)]
			b := sum[fmt.Sprintf("%s/baseline/%d", mode, c)]
			if n == nil {
				continue
			}
			lat := func(s *echoSummary) string {
				if s == nil {
					return "-"
				}
				return report.Ms(int64(s.P50)) + " / " + report.Ms(int64(s.P99)) + " / " + report.Ms(int64(s.P999))
			}
			bt, ratio, bcpu, berr := "-", "-", "-", "-"
			if b != nil {
				bt = fmt.Sprintf("%.0f", b.Throughput)
				if b.Throughput > 0 {
					ratio = fmt.Sprintf("%.2fx", n.Throughput/b.Throughput)
				}
				bcpu = fmt.Sprintf("%.0f%%", b.ServerCPU)
				berr = fmt.Sprint(b.Errors + b.Timeouts)
			}
			t.Add(c, fmt.Sprintf("%.0f", n.Throughput), bt, ratio, lat(n), lat(b),
				fmt.Sprintf("%.0f%% / %s", n.ServerCPU, bcpu), fmt.Sprintf("%d / %s", n.Errors+n.Timeouts, berr))
		}
		d.AddTable(t)
	}
	// Throughput vs concurrency.
	var series []report.Series
	keys := map[string]bool{}
	for _, p := range points {
		keys[p.Impl+" "+p.Mode] = true
	}
	for k := range keys {
		impl, mode, _ := strings.Cut(k, " ")
		s := report.Series{Name: k}
		for _, c := range cs {
			if e := sum[fmt.Sprintf("%s/%s/%d", mode, impl, c)]; e != nil {
				s.X = append(s.X, float64(c))
				s.Y = append(s.Y, e.Throughput)
			}
		}
		series = append(series, s)
	}
	if err := report.LinePlot(filepath.Join(o.out, "echo-throughput.png"), report.PlotOpts{
		Title: "Echo throughput vs concurrency (" + o.transport + ")", X: "concurrent clients (C)", Y: "responses per second",
		LogX: true, Points: true, YFrom0: true}, series); err != nil {
		return err
	}
	d.Add("![throughput vs concurrency](echo-throughput.png)\n")
	// Latency distribution at latC: the run with the median throughput.
	latC := cs[len(cs)-1]
	for _, c := range cs {
		if c == o.latC {
			latC = c
		}
	}
	var lseries []report.Series
	for k := range keys {
		impl, mode, _ := strings.Cut(k, " ")
		var ps []echoPoint
		for _, p := range points {
			if p.Impl == impl && p.Mode == mode && p.C == latC {
				ps = append(ps, p)
			}
		}
		if len(ps) == 0 {
			continue
		}
		sort.Slice(ps, func(i, j int) bool { return ps[i].Throughput < ps[j].Throughput })
		p := ps[len(ps)/2]
		s := report.Series{Name: k}
		for _, pt := range p.Latency.CDF() {
			s.X = append(s.X, pt[0]/1e6)
			s.Y = append(s.Y, pt[1])
		}
		lseries = append(lseries, s)
	}
	if err := report.LinePlot(filepath.Join(o.out, "echo-latency.png"), report.PlotOpts{
		Title: fmt.Sprintf("Echo latency distribution, C=%d (%s)", latC, o.transport), X: "latency (ms, log scale)",
		Y: "fraction of requests at or below", LogX: true}, lseries); err != nil {
		return err
	}
	d.Add("![latency distribution](echo-latency.png)\n")
	var sums []*echoSummary
	for _, s := range sum {
		sums = append(sums, s)
	}
	sort.Slice(sums, func(i, j int) bool {
		a, b := sums[i], sums[j]
		if a.Mode != b.Mode {
			return a.Mode < b.Mode
		}
		if a.Impl != b.Impl {
			return a.Impl > b.Impl
		}
		return a.C < b.C
	})
	if err := report.Write(o.out, "echo", d, struct {
		Summary []*echoSummary `json:"summary"`
		Points  []echoPoint    `json:"points"`
	}{sums, points}); err != nil {
		return err
	}
	fmt.Print(d.Markdown())
	return nil
}
