package loadgen

import (
	"time"

	"github.com/nanomesh/nanomesh/bench/internal/child"
)

// Sub is the hidden subcommand that runs a load generator child.
const Sub = "_loadgen"

// Ready is the message a generator sends once its clients are connected.
type Ready struct {
	Counters
	StartNS int64 `json:"startNs"` // unix nanos when dialing began
	EndNS   int64 `json:"endNs"`   // unix nanos when the last client settled
}

// Progress is sent every second while connecting or churning.
type Progress struct {
	Ready  int64 `json:"ready"`
	Failed int64 `json:"failed"`
	Cycles int64 `json:"cycles"`
}

// ChurnResult is the result of a churn run.
type ChurnResult struct {
	Result
	ElapsedNS int64 `json:"elapsedNs"`
}

// Main runs a load generator child: it reads its Config from stdin, connects,
// and then obeys commands ("start", "measure", "stop", "stats", "close")
// until stdin is closed.
func Main() error {
	var cfg Config
	cmds, err := child.ReadConfig(&cfg)
	if err != nil {
		return err
	}
	out := child.NewOut()
	g, err := New(cfg)
	if err != nil {
		return err
	}
	defer g.Stop()
	if cfg.Mode == ModeChurn {
		out.Send("ready", Ready{})
		for cmd := range cmds {
			if cmd != "start" {
				continue
			}
			start := time.Now()
			g.Churn(func(done int64) { out.Send("progress", Progress{Cycles: done, Failed: g.failed.Load()}) })
			out.Send("result", ChurnResult{
				Result:    Result{Counters: g.Counters(), Latency: g.lat.Snapshot()},
				ElapsedNS: int64(time.Since(start)),
			})
		}
		return nil
	}
	start := time.Now()
	g.Connect(func(ready, failed int64) { out.Send("progress", Progress{Ready: ready, Failed: failed}) })
	out.Send("ready", Ready{Counters: g.Counters(), StartNS: start.UnixNano(), EndNS: time.Now().UnixNano()})
	if cfg.Mode == ModeBroadcast {
		g.WaitJoined(60 * time.Second)
		out.Send("joined", g.Counters())
	}
	for cmd := range cmds {
		switch cmd {
		case "start":
			g.Start()
			out.Send("started", nil)
		case "measure":
			g.Measure()
			out.Send("measuring", nil)
		case "stop":
			out.Send("result", g.StopLoad())
		case "stats":
			out.Send("stats", g.Counters())
		case "close":
			g.CloseAll()
			out.Send("closed", g.Counters())
		}
	}
	return nil
}
