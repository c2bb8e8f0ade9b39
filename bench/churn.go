package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"time"

	"github.com/nanomesh/nanomesh/bench/internal/loadgen"
	"github.com/nanomesh/nanomesh/bench/internal/report"
	"github.com/nanomesh/nanomesh/bench/internal/server"
)

type churnState struct {
	RSSKiB     int64  `json:"rssKiB"`
	Goroutines int    `json:"goroutines"`
	Sessions   int64  `json:"sessions"`
	Conns      int64  `json:"conns"`
	HeapInuse  uint64 `json:"heapInuse"`
}

type churnRun struct {
	Impl          string           `json:"impl"`
	Transport     string           `json:"transport"`
	Run           int              `json:"run"`
	Concurrency   int              `json:"concurrency"`
	Cycles        int64            `json:"cycles"`
	Failed        int64            `json:"failed"`
	ConnectErrors map[string]int64 `json:"connectErrors,omitempty"`
	Seconds       float64          `json:"seconds"`
	CyclesPerSec  float64          `json:"cyclesPerSec"`
	P50           int64            `json:"p50Ns"` // one cycle: connect, handshake, ack, close
	P99           int64            `json:"p99Ns"`
	ServerOpened  int64            `json:"serverOpened"` // sessions the server established during the churn
	ServerCPU     float64          `json:"serverCpuPercent"`
	Before        churnState       `json:"before"`  // idle server, after GC
	After         churnState       `json:"after"`   // right after the last cycle
	Settled       churnState       `json:"settled"` // after the settle time, after GC
}

type churnOpts struct {
	common
	cycles      int
	concurrency int
	transports  string
	runs        int
	lgPollers   int
}

func runChurn(args []string) error {
	var o churnOpts
	fs := flag.NewFlagSet("churn", flag.ExitOnError)
	o.register(fs)
	fs.IntVar(&o.cycles, "cycles", 20000, "connect/handshake/close cycles per run")
	fs.IntVar(&o.concurrency, "concurrency", 64, "cycles in progress at once")
	fs.StringVar(&o.transports, "transport", "tcp,ws", "transports to run, separately")
	fs.IntVar(&o.runs, "runs", 3, "runs per implementation and transport (tables show medians)")
	fs.IntVar(&o.lgPollers, "lgpollers", 1, "event-loop goroutines of the load generator")
	_ = fs.Parse(args)
	if err := o.init("churn", args); err != nil {
		return err
	}
	var runs []churnRun
	for _, tr := range parseList(o.transports) {
		for r := range o.runs {
			for _, impl := range impls(o.baseline) {
				res, err := o.one(impl, tr, r)
				if err != nil {
					return fmt.Errorf("%s %s run %d: %w", impl, tr, r+1, err)
				}
				runs = append(runs, res)
			}
		}
	}
	return o.write(runs)
}

func state(s *srvProc, gc bool) (churnState, error) {
	var st server.Stats
	var err error
	if gc {
		st, err = s.gcStats()
	} else {
		st, err = s.stats()
	}
	if err != nil {
		return churnState{}, err
	}
	return churnState{RSSKiB: s.proc().RSSKiB, Goroutines: st.Goroutines, Sessions: st.Sessions, Conns: st.Conns, HeapInuse: st.HeapInuse}, nil
}

func (o *churnOpts) one(impl, tr string, run int) (churnRun, error) {
	tag := fmt.Sprintf("%s %s #%d", impl, tr, run+1)
	res := churnRun{Impl: impl, Transport: tr, Run: run + 1, Concurrency: o.concurrency}
	o.waitConntrack(2 * o.cycles)
	cfg := server.Config{Impl: impl, Role: server.RoleSingle}
	if tr == "ws" {
		cfg.WS = "0.0.0.0:0"
	} else {
		cfg.TCP = "0.0.0.0:0"
	}
	s, err := o.startServer(impl+"-single", cfg)
	if err != nil {
		return res, err
	}
	defer s.quit()
	time.Sleep(o.settle / 2)
	if res.Before, err = state(s, true); err != nil {
		return res, err
	}
	st0, err := s.stats()
	if err != nil {
		return res, err
	}
	addr := s.ready.TCP
	if tr == "ws" {
		addr = s.ready.WS
	}
	lg, err := o.startLoadgen("loadgen", loadgen.Config{Mode: loadgen.ModeChurn, Transport: tr, Targets: targets(addr, 4),
		Sources: sources(0, 8), N: o.concurrency, Cycles: o.cycles, Pollers: o.lgPollers})
	if err != nil {
		return res, err
	}
	defer lg.Close(30 * time.Second)
	if _, err := lg.Expect("ready", time.Minute, nil); err != nil {
		return res, err
	}
	c0 := s.proc().CPUTick
	t0 := time.Now()
	if err := lg.Send("start"); err != nil {
		return res, err
	}
	var cr loadgen.ChurnResult
	for {
		select {
		case m := <-lg.Messages("progress"):
			var pr loadgen.Progress
			_ = json.Unmarshal(m.Data, &pr)
			o.progress("%s: %d/%d cycles, %d failed", tag, pr.Cycles, o.cycles, pr.Failed)
			continue
		case m := <-lg.Messages("result"):
			if err := json.Unmarshal(m.Data, &cr); err != nil {
				return res, err
			}
		case <-lg.Exited():
			return res, fmt.Errorf("load generator exited: %v", lg.Err())
		case <-time.After(15 * time.Minute):
			return res, fmt.Errorf("churn did not finish")
		}
		break
	}
	el := time.Since(t0)
	res.ServerCPU = cpuPercent(s.proc().CPUTick-c0, el)
	res.Cycles, res.Failed, res.ConnectErrors = cr.Cycles, cr.Failed, cr.ConnectErrors
	res.Seconds = float64(cr.ElapsedNS) / 1e9
	if res.Seconds > 0 {
		res.CyclesPerSec = float64(res.Cycles) / res.Seconds
	}
	res.P50, res.P99 = cr.Latency.Quantile(0.5), cr.Latency.Quantile(0.99)
	if res.After, err = state(s, false); err != nil {
		return res, err
	}
	time.Sleep(o.settle)
	if res.Settled, err = state(s, true); err != nil {
		return res, err
	}
	if st, err := s.stats(); err == nil {
		res.ServerOpened = st.Opened - st0.Opened
	}
	o.progress("%s: %d cycles in %.1fs = %.0f/s (p50 %s, p99 %s), %d failed; server RSS %s -> %s -> %s, goroutines %d -> %d -> %d, sessions left %d",
		tag, res.Cycles, res.Seconds, res.CyclesPerSec, report.Ms(res.P50), report.Ms(res.P99), res.Failed,
		report.MiB(res.Before.RSSKiB), report.MiB(res.After.RSSKiB), report.MiB(res.Settled.RSSKiB),
		res.Before.Goroutines, res.After.Goroutines, res.Settled.Goroutines, res.Settled.Sessions)
	return res, nil
}

func (o *churnOpts) write(runs []churnRun) error {
	d := o.doc()
	d.Add("Each cycle: TCP connect (plus the WebSocket upgrade for ws), protocol handshake, HandshakeAck, close by "+
		"the client. %d cycles per run with %d in progress at once, from one load generator process. Server state: "+
		"before = idle server after GC; after = right after the last cycle; settled = %v later (-settle), after GC. "+
		"\"opened\" counts sessions the server established (it must equal the cycles). Medians of %d run(s).\n",
		o.cycles, o.concurrency, o.settle, o.runs)
	t := &report.Table{Title: "Churn", Header: []string{"transport", "server", "cycles", "failed", "cycles/s", "cycle p50 / p99",
		"server CPU", "opened", "RSS before / after / settled", "goroutines before / after / settled", "sessions+conns left"}}
	type key struct{ tr, impl string }
	groups := map[key][]churnRun{}
	var keys []key
	for _, r := range runs {
		k := key{r.Transport, r.Impl}
		if _, ok := groups[k]; !ok {
			keys = append(keys, k)
		}
		groups[k] = append(groups[k], r)
	}
	summary := map[string]map[string]float64{}
	for _, k := range keys {
		rs := groups[k]
		med := func(f func(churnRun) float64) float64 {
			xs := make([]float64, len(rs))
			for i, r := range rs {
				xs[i] = f(r)
			}
			return report.Median(xs)
		}
		m := map[string]float64{
			"cycles":            med(func(r churnRun) float64 { return float64(r.Cycles) }),
			"failed":            med(func(r churnRun) float64 { return float64(r.Failed) }),
			"cyclesPerSec":      med(func(r churnRun) float64 { return r.CyclesPerSec }),
			"p50Ns":             med(func(r churnRun) float64 { return float64(r.P50) }),
			"p99Ns":             med(func(r churnRun) float64 { return float64(r.P99) }),
			"serverCpuPercent":  med(func(r churnRun) float64 { return r.ServerCPU }),
			"opened":            med(func(r churnRun) float64 { return float64(r.ServerOpened) }),
			"rssBeforeKiB":      med(func(r churnRun) float64 { return float64(r.Before.RSSKiB) }),
			"rssAfterKiB":       med(func(r churnRun) float64 { return float64(r.After.RSSKiB) }),
			"rssSettledKiB":     med(func(r churnRun) float64 { return float64(r.Settled.RSSKiB) }),
			"goroutinesBefore":  med(func(r churnRun) float64 { return float64(r.Before.Goroutines) }),
			"goroutinesAfter":   med(func(r churnRun) float64 { return float64(r.After.Goroutines) }),
			"goroutinesSettled": med(func(r churnRun) float64 { return float64(r.Settled.Goroutines) }),
			"leftSettled":       med(func(r churnRun) float64 { return float64(r.Settled.Sessions + r.Settled.Conns) }),
		}
		summary[k.tr+"/"+k.impl] = m
		t.Add(k.tr, k.impl, fmt.Sprintf("%.0f", m["cycles"]), fmt.Sprintf("%.0f", m["failed"]), fmt.Sprintf("%.0f", m["cyclesPerSec"]),
			report.Ms(int64(m["p50Ns"]))+" / "+report.Ms(int64(m["p99Ns"])), fmt.Sprintf("%.0f%%", m["serverCpuPercent"]),
			fmt.Sprintf("%.0f", m["opened"]),
			report.MiB(int64(m["rssBeforeKiB"]))+" / "+report.MiB(int64(m["rssAfterKiB"]))+" / "+report.MiB(int64(m["rssSettledKiB"])),
			fmt.Sprintf("%.0f / %.0f / %.0f", m["goroutinesBefore"], m["goroutinesAfter"], m["goroutinesSettled"]),
			fmt.Sprintf("%.0f", m["leftSettled"]))
	}
	d.AddTable(t)
	for _, k := range keys {
		for _, r := range groups[k] {
			if len(r.ConnectErrors) > 0 {
				d.Add("Errors (%s %s run %d): %s\n", k.tr, k.impl, r.Run, fmtCounts(r.ConnectErrors))
			}
		}
	}
	if err := report.Write(o.out, "churn", d, struct {
		Summary map[string]map[string]float64 `json:"summary"`
		Runs    []churnRun                    `json:"runs"`
	}{summary, runs}); err != nil {
		return err
	}
	fmt.Print(d.Markdown())
	return nil
}
