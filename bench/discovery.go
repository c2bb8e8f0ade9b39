package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/nanomesh/nanomesh/bench/internal/loadgen"
	"github.com/nanomesh/nanomesh/bench/internal/report"
	"github.com/nanomesh/nanomesh/bench/internal/server"
	"github.com/nanomesh/nanomesh/client"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// eventLog records membership events with their times and lets callers wait
// for one.
type eventLog struct {
	mu     sync.Mutex
	cond   *sync.Cond
	events []server.Member
}

func newEventLog() *eventLog {
	l := &eventLog{}
	l.cond = sync.NewCond(&l.mu)
	return l
}

func (l *eventLog) add(m server.Member) {
	l.mu.Lock()
	l.events = append(l.events, m)
	l.mu.Unlock()
	l.cond.Broadcast()
}

// wait returns the time of the first event ev for id at or after since.
func (l *eventLog) wait(ev, id string, since int64, timeout time.Duration) (int64, error) {
	deadline := time.Now().Add(timeout)
	t := time.AfterFunc(timeout, l.cond.Broadcast)
	defer t.Stop()
	l.mu.Lock()
	defer l.mu.Unlock()
	for {
		for _, e := range l.events {
			if e.Event == ev && e.ID == id && e.T >= since {
				return e.T, nil
			}
		}
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("no %s event for %s within %v", ev, id, timeout)
		}
		l.cond.Wait()
	}
}

type regSample struct {
	Backend       string  `json:"backend"`
	SpawnToRegMs  float64 `json:"spawnToRegisteredMs"` // process start -> record in etcd
	GateTableMs   float64 `json:"gateTableMs"`         // record in etcd -> gate's member table
	FirstRoutedMs float64 `json:"firstRoutedMs"`       // record in etcd -> first request handled by the new node
	ClientOKMs    float64 `json:"clientOkMs"`          // record in etcd -> first success seen by a client polling every 1 ms
	EtcdWatcherMs float64 `json:"etcdWatcherMs"`       // when the bench's own etcd watcher saw it, relative to the reference
}

type crashSample struct {
	Backend       string  `json:"backend"`
	EtcdRemovalMs float64 `json:"etcdRemovalMs"` // SIGKILL -> record deleted in etcd (lease expiry)
	GateRemovalMs float64 `json:"gateRemovalMs"` // SIGKILL -> gate's member table drops it
}

type loadSummary struct {
	Clients        int              `json:"clients"`
	Seconds        float64          `json:"seconds"`
	Responses      int64            `json:"responses"`
	ErrorResponses int64            `json:"errorResponses"`
	ErrorCodes     map[string]int64 `json:"errorCodes,omitempty"`
	Timeouts       int64            `json:"timeouts"`
	ClosedByServer int64            `json:"closedByServer"`
	Failed         int64            `json:"failed"` // error responses + timeouts + dropped clients
	Throughput     float64          `json:"throughput"`
	P99            int64            `json:"p99Ns"`
	Max            int64            `json:"maxNs"`
}

type discResult struct {
	LeaseTTLSec     float64       `json:"leaseTtlSec"`
	Backends        int           `json:"backends"`
	Registration    []regSample   `json:"registration"`
	RollingRestarts int           `json:"rollingRestarts"`
	Rolling         loadSummary   `json:"rolling"`
	Crashes         []crashSample `json:"crashes"`
	CrashLoad       loadSummary   `json:"crashLoad"`
}

type discOpts struct {
	common
	backends int
	ttl      time.Duration
	clients  int
	rounds   int
	crashes  int
}

func runDiscovery(args []string) error {
	var o discOpts
	fs := flag.NewFlagSet("discovery", flag.ExitOnError)
	o.register(fs)
	fs.IntVar(&o.backends, "backends", 3, "backend processes serving bench.echo")
	fs.DurationVar(&o.ttl, "ttl", 5*time.Second, "etcd lease TTL of every node")
	fs.IntVar(&o.clients, "clients", 50, "clients sending bench.echo in a closed loop during restarts and crashes")
	fs.IntVar(&o.rounds, "rounds", 2, "rolling restarts of all backends (one backend at a time)")
	fs.IntVar(&o.crashes, "crashes", 3, "backends killed with SIGKILL (one at a time, each restarted after)")
	_ = fs.Parse(args)
	if err := o.init("discovery", args); err != nil {
		return err
	}
	o.baseline = false // no baseline: nano/pitaya discovery is not comparable
	res, err := o.run()
	if err != nil {
		return err
	}
	return o.write(res)
}

func (o *discOpts) run() (*discResult, error) {
	res := &discResult{LeaseTTLSec: o.ttl.Seconds(), Backends: o.backends}
	var etcd etcdOnce
	defer etcd.close()
	eps, err := etcd.endpoints()
	if err != nil {
		return nil, err
	}
	// Watch etcd directly: the time a record appears or vanishes there is
	// the reference for registration and removal.
	cli, err := clientv3.New(clientv3.Config{Endpoints: eps, DialTimeout: 5 * time.Second})
	if err != nil {
		return nil, err
	}
	defer cli.Close()
	etcdLog := newEventLog()
	wctx, wcancel := context.WithCancel(context.Background())
	defer wcancel()
	wch := cli.Watch(wctx, "/nanomesh/members/", clientv3.WithPrefix())
	go func() {
		for wr := range wch {
			now := time.Now().UnixNano()
			for _, ev := range wr.Events {
				id := strings.TrimPrefix(string(ev.Kv.Key), "/nanomesh/members/")
				typ := "put"
				if ev.Type == clientv3.EventTypeDelete {
					typ = "delete"
				}
				etcdLog.add(server.Member{Event: typ, ID: id, T: now})
			}
		}
	}()
	gateLog := newEventLog()
	gate, err := o.startServer("gate", server.Config{Impl: server.Nanomesh, Role: server.RoleGate, ID: "gate-1",
		TCP: "0.0.0.0:0", Etcd: eps, LeaseTTL: o.ttl})
	if err != nil {
		return nil, err
	}
	defer gate.quit()
	go func() {
		for m := range gate.Messages("member") {
			var ev server.Member
			if json.Unmarshal(m.Data, &ev) == nil {
				gateLog.add(ev)
			}
		}
	}()
	backends := make([]*srvProc, o.backends)
	defer func() {
		for _, b := range backends {
			if b != nil {
				b.Kill()
			}
		}
	}()
	start := func(i int) (*srvProc, int64, error) {
		id := fmt.Sprintf("backend-%d", i+1)
		spawn := time.Now().UnixNano()
		b, err := o.startServer(id, server.Config{Impl: server.Nanomesh, Role: server.RoleBackend, ID: id,
			Etcd: eps, LeaseTTL: o.ttl, Probe: fmt.Sprintf("probe%d", i+1)})
		if err != nil {
			return nil, 0, err
		}
		if _, err := gateLog.wait("put", id, spawn, 30*time.Second); err != nil {
			return b, spawn, err
		}
		return b, spawn, nil
	}

	// 1. Registration -> first routed request, once per backend.
	for i := range o.backends {
		id := fmt.Sprintf("backend-%d", i+1)
		route := fmt.Sprintf("probe%d.ping", i+1)
		okc := make(chan int64, 1)
		pctx, pcancel := context.WithTimeout(context.Background(), 60*time.Second)
		go func() { okc <- probe(pctx, "tcp://"+targets(gate.ready.TCP, 1)[0], route) }()
		time.Sleep(o.settle / 10) // the prober is connected and polling
		b, spawn, err := start(i)
		if err != nil {
			pcancel()
			return nil, err
		}
		backends[i] = b
		okT := <-okc
		pcancel()
		if okT == 0 {
			return nil, fmt.Errorf("%s: route %s never served", id, route)
		}
		first, err := b.Expect("first", 10*time.Second, nil)
		if err != nil {
			return nil, err
		}
		reg, err := etcdLog.wait("put", id, spawn, 10*time.Second)
		if err != nil {
			return nil, err
		}
		gput, _ := gateLog.wait("put", id, spawn, 10*time.Second)
		// The reference is the first sighting of the record by either
		// watcher: the bench process's own can lag by scheduling delay.
		ref := min(reg, gput)
		s := regSample{Backend: id, SpawnToRegMs: ms(ref - spawn), GateTableMs: ms(gput - ref),
			FirstRoutedMs: ms(first.T - ref), ClientOKMs: ms(okT - ref), EtcdWatcherMs: ms(reg - ref)}
		res.Registration = append(res.Registration, s)
		o.progress("%s registered %.0f ms after spawn; gate table +%.1f ms, first routed request +%.1f ms, client OK +%.1f ms",
			id, s.SpawnToRegMs, s.GateTableMs, s.FirstRoutedMs, s.ClientOKMs)
	}

	runLoad := func(what string, body func() error) (loadSummary, error) {
		ls := loadSummary{Clients: o.clients}
		lg, err := o.startLoadgen("loadgen", loadgen.Config{Mode: loadgen.ModeEcho, Transport: "tcp",
			Targets: targets(gate.ready.TCP, 4), Sources: sources(0, 4), N: o.clients, Route: "bench.echo",
			Payload: `{"msg":"rolling"}`, RequestTimeout: 5 * time.Second})
		if err != nil {
			return ls, err
		}
		defer lg.Close(30 * time.Second)
		if err := o.waitReady([]*lgProc{lg}, time.Minute, what, nil); err != nil {
			return ls, err
		}
		if err := lg.Send("start"); err != nil {
			return ls, err
		}
		time.Sleep(o.settle / 2)
		if err := lg.Send("measure"); err != nil {
			return ls, err
		}
		berr := body()
		time.Sleep(o.settle)
		var r loadgen.Result
		if err := lg.Call("stop", "result", time.Minute, &r); err != nil {
			return ls, err
		}
		ls.Seconds = float64(r.MeasureNS) / 1e9
		ls.Responses, ls.ErrorResponses, ls.ErrorCodes = r.Responses, r.ErrorResponses, r.ErrorCodes
		ls.Timeouts, ls.ClosedByServer = r.Timeouts, r.ClosedByServer
		ls.Failed = ls.ErrorResponses + ls.Timeouts + ls.ClosedByServer
		if ls.Seconds > 0 {
			ls.Throughput = float64(ls.Responses) / ls.Seconds
		}
		ls.P99, ls.Max = r.Latency.Quantile(0.99), r.Latency.Max
		return ls, berr
	}

	// 2. Rolling restart under load: each backend in turn shuts down
	// gracefully and a new process takes its id.
	res.Rolling, err = runLoad("rolling restart", func() error {
		for round := range o.rounds {
			for i := range o.backends {
				id := fmt.Sprintf("backend-%d", i+1)
				t0 := time.Now()
				backends[i].quit()
				backends[i] = nil
				down := time.Since(t0)
				b, _, err := start(i)
				if err != nil {
					return err
				}
				backends[i] = b
				res.RollingRestarts++
				o.progress("rolling restart %d/%d: %s drained in %v, replacement routable after %v",
					round*o.backends+i+1, o.rounds*o.backends, id, down.Round(time.Millisecond), time.Since(t0).Round(time.Millisecond))
				time.Sleep(o.settle / 2)
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	o.progress("rolling restart: %d responses, %d failed (%d error responses %s, %d timeouts, %d clients dropped)",
		res.Rolling.Responses, res.Rolling.Failed, res.Rolling.ErrorResponses, fmtCounts(res.Rolling.ErrorCodes),
		res.Rolling.Timeouts, res.Rolling.ClosedByServer)

	// 3. Crash -> removal, under load.
	res.CrashLoad, err = runLoad("crash", func() error {
		for k := range o.crashes {
			i := k % o.backends
			id := fmt.Sprintf("backend-%d", i+1)
			kill := time.Now().UnixNano()
			if err := backends[i].Signal(syscall.SIGKILL); err != nil {
				return err
			}
			<-backends[i].Exited()
			backends[i] = nil
			gdel, err := gateLog.wait("delete", id, kill, o.ttl+30*time.Second)
			if err != nil {
				return err
			}
			edel, err := etcdLog.wait("delete", id, kill, 10*time.Second)
			if err != nil {
				return err
			}
			s := crashSample{Backend: id, EtcdRemovalMs: ms(edel - kill), GateRemovalMs: ms(gdel - kill)}
			res.Crashes = append(res.Crashes, s)
			o.progress("%s killed: removed from etcd after %.0f ms, from the gate's table after %.0f ms", id, s.EtcdRemovalMs, s.GateRemovalMs)
			b, _, err := start(i)
			if err != nil {
				return err
			}
			backends[i] = b
			time.Sleep(o.settle / 2)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	for i, b := range backends {
		if b != nil {
			b.quit()
			backends[i] = nil
		}
	}
	return res, nil
}

func ms(ns int64) float64 { return float64(ns) / 1e6 }

// probe requests route every millisecond until it succeeds and returns the
// time of the first success (unix nanos), or 0.
func probe(ctx context.Context, addr, route string) int64 {
	cl, err := client.Dial(ctx, addr)
	if err != nil {
		return 0
	}
	defer cl.Close()
	for ctx.Err() == nil {
		rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		err := cl.Request(rctx, route, nil, nil)
		cancel()
		if err == nil {
			return time.Now().UnixNano()
		}
		var ce *client.Error
		if !errors.As(err, &ce) {
			return 0
		}
		time.Sleep(time.Millisecond)
	}
	return 0
}

func (o *discOpts) write(r *discResult) error {
	d := o.doc()
	d.Add("One nanomesh gate and %d backends (bench.echo), each a separate process, on an embedded etcd in the bench "+
		"process; lease TTL %v. The reference time of a registration is the first sighting of the new member "+
		"record, by a watcher in the bench process (next to the etcd server) or by the gate, whichever is first (the "+
		"bench's watcher sometimes lags the gate's by a few ms of scheduling delay on this 2-core box); a removal is "+
		"timed from the SIGKILL. No baseline: nano's master and pitaya's discovery are not "+
		"comparable here.\n", r.Backends, o.ttl)
	t := &report.Table{Title: "Registration -> first routed request", Header: []string{"backend", "process spawn -> registered",
		"registered -> in gate's table", "registered -> first routed request (handled by the new node)", "registered -> client sees success"}}
	var a, b, c []float64
	for _, s := range r.Registration {
		t.Add(s.Backend, fmt.Sprintf("%.0f ms", s.SpawnToRegMs), fmt.Sprintf("%.1f ms", s.GateTableMs),
			fmt.Sprintf("%.1f ms", s.FirstRoutedMs), fmt.Sprintf("%.1f ms", s.ClientOKMs))
		a, b, c = append(a, s.GateTableMs), append(b, s.FirstRoutedMs), append(c, s.ClientOKMs)
	}
	t.Add("median", "", fmt.Sprintf("%.1f ms", report.Median(a)), fmt.Sprintf("%.1f ms", report.Median(b)), fmt.Sprintf("%.1f ms", report.Median(c)))
	d.AddTable(t)
	d.Add("The client polls the new node's own route every 1 ms (404 until the gate knows the node), so the last column has 1 ms granularity.\n")
	ct := &report.Table{Title: "Crash (SIGKILL) -> removal", Header: []string{"backend", "kill -> deleted in etcd", "kill -> gone from gate table"}}
	var e, g []float64
	for _, s := range r.Crashes {
		ct.Add(s.Backend, fmt.Sprintf("%.0f ms", s.EtcdRemovalMs), fmt.Sprintf("%.0f ms", s.GateRemovalMs))
		e, g = append(e, s.EtcdRemovalMs), append(g, s.GateRemovalMs)
	}
	ct.Add("median", fmt.Sprintf("%.0f ms", report.Median(e)), fmt.Sprintf("%.0f ms", report.Median(g)))
	d.AddTable(ct)
	lt := &report.Table{Title: "Requests under load", Header: []string{"phase", "clients", "seconds", "responses", "req/s",
		"failed", "error responses", "timeouts (5 s)", "clients dropped", "p99 / max latency"}}
	row := func(name string, l loadSummary) {
		lt.Add(name, l.Clients, fmt.Sprintf("%.1f", l.Seconds), l.Responses, fmt.Sprintf("%.0f", l.Throughput), l.Failed,
			fmt.Sprintf("%d (%s)", l.ErrorResponses, fmtCounts(l.ErrorCodes)), l.Timeouts, l.ClosedByServer,
			report.Ms(l.P99)+" / "+report.Ms(l.Max))
	}
	row(fmt.Sprintf("rolling restart (%d graceful restarts)", r.RollingRestarts), r.Rolling)
	row(fmt.Sprintf("crashes (%d SIGKILLs)", len(r.Crashes)), r.CrashLoad)
	d.AddTable(lt)
	verdict := "met"
	if r.Rolling.Failed != 0 {
		verdict = "NOT met"
	}
	d.Add("Target: zero failed requests during a graceful rolling restart: %s (%d failed of %d).\n", verdict, r.Rolling.Failed, r.Rolling.Responses+r.Rolling.Failed)
	if err := report.Write(o.out, "discovery", d, r); err != nil {
		return err
	}
	fmt.Print(d.Markdown())
	return nil
}
