package main

import (
	"flag"
	"fmt"
	"path/filepath"
	"sort"
	"time"

	"github.com/nanomesh/nanomesh/bench/internal/hist"
	"github.com/nanomesh/nanomesh/bench/internal/loadgen"
	"github.com/nanomesh/nanomesh/bench/internal/report"
	"github.com/nanomesh/nanomesh/bench/internal/server"
)

type bcastPoint struct {
	Mode             string           `json:"mode"`
	Impl             string           `json:"impl"`
	M                int              `json:"m"`
	Run              int              `json:"run"`
	Members          int64            `json:"members"`
	Broadcasts       int64            `json:"broadcasts"`
	Pushes           int64            `json:"pushes"`
	Seconds          float64          `json:"seconds"`
	BroadcastsPerSec float64          `json:"broadcastsPerSec"`
	PushesPerSec     float64          `json:"pushesPerSec"`
	DeliveryRatio    float64          `json:"deliveryRatio"` // pushes / (broadcasts x members), approximate
	P50              int64            `json:"p50Ns"`
	P99              int64            `json:"p99Ns"`
	P999             int64            `json:"p999Ns"`
	Max              int64            `json:"maxNs"`
	ServerCPU        float64          `json:"serverCpuPercent"`
	ClientCPU        float64          `json:"clientCpuPercent"`
	Kicked           int64            `json:"kicked"`
	KickReasons      map[string]int64 `json:"kickReasons,omitempty"`
	ClosedByServer   int64            `json:"closedByServer"`
	Dropped          int64            `json:"dropped"` // baseline: pushes dropped on a full write backlog
	Timeouts         int64            `json:"timeouts"`
	Latency          hist.Snapshot    `json:"latency"`
}

type bcastOpts struct {
	common
	ms        string
	modes     string
	transport string
	duration  time.Duration
	warmup    time.Duration
	runs      int
	lgPollers int
	senders   int
}

func runBroadcast(args []string) error {
	var o bcastOpts
	fs := flag.NewFlagSet("broadcast", flag.ExitOnError)
	o.register(fs)
	fs.StringVar(&o.ms, "m", "1000,10000", "group sizes, comma-separated")
	fs.StringVar(&o.modes, "modes", "local,cross", "local: group and members on one node; cross: group on a backend, members split over two gates")
	fs.StringVar(&o.transport, "transport", "tcp", "client transport: tcp or ws")
	fs.DurationVar(&o.duration, "duration", 10*time.Second, "measurement window per point")
	fs.DurationVar(&o.warmup, "warmup", 2*time.Second, "warm-up before each window")
	fs.IntVar(&o.runs, "runs", 3, "runs per point (tables show medians)")
	fs.IntVar(&o.lgPollers, "lgpollers", 1, "event-loop goroutines per load generator")
	fs.IntVar(&o.senders, "senders", 4, "members that broadcast, each in a closed loop (so this many broadcasts are in flight)")
	_ = fs.Parse(args)
	if err := o.init("broadcast", args); err != nil {
		return err
	}
	ms, err := parseInts(o.ms)
	if err != nil {
		return err
	}
	var etcd etcdOnce
	defer etcd.close()
	var points []bcastPoint
	for _, mode := range parseList(o.modes) {
		for _, impl := range impls(o.baseline) {
			if mode == "cross" && impl == server.Baseline {
				continue // the baseline has no cross-gate push path
			}
			for _, m := range ms {
				for r := range o.runs {
					// Fresh servers per point: a group only grows within a process.
					tag := fmt.Sprintf("%s %s m=%d run %d", impl, mode, m, r+1)
					o.progress("%s: starting servers", tag)
					gates := 1
					tm := "local"
					if mode == "cross" {
						gates, tm = 2, "cluster"
					}
					topo, err := o.startTopology(&etcd, impl, tm, o.transport, gates, 30*time.Second)
					if err != nil {
						return fmt.Errorf("%s: %w", tag, err)
					}
					p, err := o.point(topo, impl, mode, m, r, r == 0 && m == ms[len(ms)-1])
					if err != nil {
						topo.kill()
						return fmt.Errorf("%s: %w", tag, err)
					}
					topo.stop()
					o.progress("%s: %.0f broadcasts/s, %.0f pushes/s delivered (ratio %.3f), latency p50 %s p99 %s, server CPU %.0f%%, kicked %d, dropped %d",
						tag, p.BroadcastsPerSec, p.PushesPerSec, p.DeliveryRatio, report.Ms(p.P50), report.Ms(p.P99), p.ServerCPU, p.Kicked, p.Dropped)
					points = append(points, p)
				}
			}
		}
	}
	return o.write(points, ms)
}

func (o *bcastOpts) point(topo *topology, impl, mode string, m, run int, profile bool) (bcastPoint, error) {
	p := bcastPoint{Mode: mode, Impl: impl, M: m, Run: run + 1}
	// One load generator per gate (local: enough to stay under the fd limit).
	shards := len(topo.gates)
	for m/shards > 19000 {
		shards += len(topo.gates)
	}
	var lgs []*lgProc
	defer func() { closeAll(lgs) }()
	for i := range shards {
		g := topo.gates[i%len(topo.gates)]
		addr := g.ready.TCP
		if o.transport == "ws" {
			addr = g.ready.WS
		}
		n := m / shards
		if i < m%shards {
			n++
		}
		senders := 0
		if i == 0 {
			senders = o.senders
		}
		lg, err := o.startLoadgen(fmt.Sprintf("loadgen-%d", i+1), loadgen.Config{
			Shard: i, Mode: loadgen.ModeBroadcast, Transport: o.transport, Targets: targets(addr, 4), Sources: sources(i, 4),
			N: n, Pollers: o.lgPollers, Route: "bench.shout", JoinRoute: "bench.join", PushRoute: "onShout", Senders: senders,
		})
		if err != nil {
			return p, err
		}
		lgs = append(lgs, lg)
	}
	if err := o.waitReady(lgs, 5*time.Minute, "broadcast connect", nil); err != nil {
		return p, err
	}
	for _, l := range lgs {
		var c loadgen.Counters
		if _, err := l.Expect("joined", 2*time.Minute, &c); err != nil {
			return p, err
		}
		p.Members += c.Joined
	}
	if p.Members != int64(m) {
		return p, fmt.Errorf("%d of %d members joined", p.Members, m)
	}
	for _, l := range lgs {
		if err := l.Send("start"); err != nil {
			return p, err
		}
	}
	time.Sleep(o.warmup)
	var waits []func()
	if profile {
		for _, s := range topo.all {
			waits = append(waits, o.cpuProfile(s, int(o.duration.Seconds()), fmt.Sprintf("broadcast-%s-%s-m%d", mode, s.Name, m)))
		}
	}
	for _, l := range lgs {
		if err := l.Send("measure"); err != nil {
			return p, err
		}
	}
	var c0 int64
	for _, l := range lgs {
		c0 += must(readStat(l.Pid())).CPUTick
	}
	s0, t0 := topo.cpuTicks(), time.Now()
	time.Sleep(o.duration)
	for _, l := range lgs {
		if err := l.Send("stop"); err != nil {
			return p, err
		}
	}
	var lat hist.Snapshot
	for i, l := range lgs {
		var res loadgen.Result
		if _, err := l.Expect("result", time.Minute, &res); err != nil {
			return p, err
		}
		if i == 0 {
			p.Broadcasts = res.Responses
			p.Seconds = float64(res.MeasureNS) / 1e9
		}
		p.Pushes += res.Pushes
		p.Kicked += res.Kicked
		p.ClosedByServer += res.ClosedByServer
		p.Timeouts += res.Timeouts
		for k, v := range res.KickReasons {
			if p.KickReasons == nil {
				p.KickReasons = map[string]int64{}
			}
			p.KickReasons[k] += v
		}
		lat.Merge(res.Latency)
	}
	el := time.Since(t0)
	p.ServerCPU = cpuPercent(topo.cpuTicks()-s0, el)
	var c1 int64
	for _, l := range lgs {
		c1 += must(readStat(l.Pid())).CPUTick
	}
	p.ClientCPU = cpuPercent(c1-c0, el)
	for _, w := range waits {
		w()
	}
	for _, s := range topo.all {
		if st, err := s.stats(); err == nil {
			p.Dropped += st.Dropped
		}
	}
	if p.Seconds > 0 {
		p.BroadcastsPerSec = float64(p.Broadcasts) / p.Seconds
		p.PushesPerSec = float64(p.Pushes) / p.Seconds
	}
	if p.Broadcasts > 0 {
		p.DeliveryRatio = float64(p.Pushes) / float64(p.Broadcasts*int64(m))
	}
	p.Latency = lat
	p.P50, p.P99, p.P999, p.Max = lat.Quantile(0.5), lat.Quantile(0.99), lat.Quantile(0.999), lat.Max
	return p, nil
}

func (o *bcastOpts) write(points []bcastPoint, ms []int) error {
	d := o.doc()
	d.Add("A group of M members (clients over %s, each joined with `bench.join`). %d members send `bench.shout` "+
		"requests, each in a closed loop: a sender sends its next broadcast once it has both the response and its own copy of "+
		"its previous push, so %d broadcasts are in flight. The handler broadcasts the request body (a send timestamp) to the group on `onShout`. "+
		"Delivery latency = receive time - send timestamp, over every push received by every member. local = group "+
		"and members on one node; cross = the group lives on a backend, members are split over two gates (one "+
		"batched push per gate per broadcast). The baseline (nano-style Group: a push per member onto its writer "+
		"channel) runs the local mode only. %v warm-up, %v measured, median of %d run(s); fresh servers per run.\n",
		o.transport, o.senders, o.senders, o.warmup, o.duration, o.runs)
	type key struct {
		mode, impl string
		m          int
	}
	groups := map[key][]bcastPoint{}
	var keys []key
	for _, p := range points {
		k := key{p.Mode, p.Impl, p.M}
		if _, ok := groups[k]; !ok {
			keys = append(keys, k)
		}
		groups[k] = append(groups[k], p)
	}
	t := &report.Table{Title: "Broadcast fan-out", Header: []string{"mode", "M", "server", "broadcasts/s", "pushes delivered/s",
		"delivery ratio", "latency p50 / p99 / p999", "server CPU", "load gen CPU", "kicked / dropped"}}
	type summary struct {
		Mode             string  `json:"mode"`
		Impl             string  `json:"impl"`
		M                int     `json:"m"`
		BroadcastsPerSec float64 `json:"broadcastsPerSec"`
		PushesPerSec     float64 `json:"pushesPerSec"`
		DeliveryRatio    float64 `json:"deliveryRatio"`
		P50              float64 `json:"p50Ns"`
		P99              float64 `json:"p99Ns"`
		P999             float64 `json:"p999Ns"`
		ServerCPU        float64 `json:"serverCpuPercent"`
		ClientCPU        float64 `json:"clientCpuPercent"`
		Kicked           int64   `json:"kicked"`
		Dropped          int64   `json:"dropped"`
		Runs             int     `json:"runs"`
	}
	var sums []summary
	for _, k := range keys {
		ps := groups[k]
		med := func(f func(bcastPoint) float64) float64 {
			xs := make([]float64, len(ps))
			for i, p := range ps {
				xs[i] = f(p)
			}
			return report.Median(xs)
		}
		s := summary{Mode: k.mode, Impl: k.impl, M: k.m, Runs: len(ps),
			BroadcastsPerSec: med(func(p bcastPoint) float64 { return p.BroadcastsPerSec }),
			PushesPerSec:     med(func(p bcastPoint) float64 { return p.PushesPerSec }),
			DeliveryRatio:    med(func(p bcastPoint) float64 { return p.DeliveryRatio }),
			P50:              med(func(p bcastPoint) float64 { return float64(p.P50) }),
			P99:              med(func(p bcastPoint) float64 { return float64(p.P99) }),
			P999:             med(func(p bcastPoint) float64 { return float64(p.P999) }),
			ServerCPU:        med(func(p bcastPoint) float64 { return p.ServerCPU }),
			ClientCPU:        med(func(p bcastPoint) float64 { return p.ClientCPU }),
		}
		for _, p := range ps {
			s.Kicked += p.Kicked
			s.Dropped += p.Dropped
		}
		sums = append(sums, s)
		t.Add(k.mode, k.m, k.impl, fmt.Sprintf("%.0f", s.BroadcastsPerSec), fmt.Sprintf("%.0f", s.PushesPerSec),
			fmt.Sprintf("%.3f", s.DeliveryRatio), report.Ms(int64(s.P50))+" / "+report.Ms(int64(s.P99))+" / "+report.Ms(int64(s.P999)),
			fmt.Sprintf("%.0f%%", s.ServerCPU), fmt.Sprintf("%.0f%%", s.ClientCPU), fmt.Sprintf("%d / %d", s.Kicked, s.Dropped))
	}
	d.AddTable(t)
	// Latency CDF of the largest group, one line per mode/impl (median-throughput run).
	mMax := ms[len(ms)-1]
	var series []report.Series
	for _, k := range keys {
		if k.m != mMax {
			continue
		}
		ps := append([]bcastPoint(nil), groups[k]...)
		sort.Slice(ps, func(i, j int) bool { return ps[i].PushesPerSec < ps[j].PushesPerSec })
		p := ps[len(ps)/2]
		s := report.Series{Name: k.impl + " " + k.mode}
		for _, pt := range p.Latency.CDF() {
			s.X = append(s.X, pt[0]/1e6)
			s.Y = append(s.Y, pt[1])
		}
		series = append(series, s)
	}
	if err := report.LinePlot(filepath.Join(o.out, "broadcast-latency.png"), report.PlotOpts{
		Title: fmt.Sprintf("Broadcast delivery latency, M=%d (%s)", mMax, o.transport), X: "latency (ms, log scale)",
		Y: "fraction of pushes at or below", LogX: true}, series); err != nil {
		return err
	}
	d.Add("![broadcast latency](broadcast-latency.png)\n")
	if err := report.Write(o.out, "broadcast", d, struct {
		Summary []summary    `json:"summary"`
		Points  []bcastPoint `json:"points"`
	}{sums, points}); err != nil {
		return err
	}
	fmt.Print(d.Markdown())
	return nil
}
