package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/nanomesh/nanomesh/bench/internal/loadgen"
	"github.com/nanomesh/nanomesh/bench/internal/server"
)

// The tests run every scenario at a tiny scale so that the benchmark code
// cannot rot. They check that the result files are written and that the
// figures are sane (present, non-zero), never timing thresholds.

// TestMain lets the test binary act as the children the scenarios start
// (they re-execute the current binary with a hidden subcommand).
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && (os.Args[1] == loadgen.Sub || os.Args[1] == server.Sub) {
		if err := dispatch(os.Args[1:]); err != nil {
			fmt.Fprintln(os.Stderr, "bench child:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// results runs a scenario into a temporary directory and returns the
// decoded "results" of its JSON file after checking the other outputs.
func results(t *testing.T, run func([]string) error, name string, pngs []string, args ...string) map[string]any {
	t.Helper()
	dir := t.TempDir()
	if err := run(append([]string{"-out", dir, "-q", "-settle", "200ms"}, args...)); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	for _, f := range append([]string{name + ".md", name + ".json"}, pngs...) {
		st, err := os.Stat(filepath.Join(dir, f))
		if err != nil || st.Size() == 0 {
			t.Fatalf("%s: output %s missing or empty: %v", name, f, err)
		}
	}
	b, err := os.ReadFile(filepath.Join(dir, name+".json"))
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Results map[string]any `json:"results"`
	}
	if err := json.Unmarshal(b, &doc); err != nil {
		t.Fatal(err)
	}
	return doc.Results
}

// num returns the number at path (map keys and slice indexes) in v.
func num(t *testing.T, v any, path ...any) float64 {
	t.Helper()
	for _, p := range path {
		switch k := p.(type) {
		case string:
			m, ok := v.(map[string]any)
			if !ok {
				t.Fatalf("%v: not an object at %q", path, k)
			}
			v = m[k]
		case int:
			s, ok := v.([]any)
			if !ok || k >= len(s) {
				t.Fatalf("%v: no element %d", path, k)
			}
			v = s[k]
		}
	}
	f, ok := v.(float64)
	if !ok {
		t.Fatalf("%v: %v is not a number", path, v)
	}
	return f
}

func positive(t *testing.T, what string, v float64) {
	t.Helper()
	if !(v > 0) {
		t.Errorf("%s = %v, want > 0", what, v)
	}
}

func TestConns(t *testing.T) {
	r := results(t, runConns, "conns", []string{"conns-memory.png"},
		"-n", "24", "-gates", "2", "-loadgens", "2", "-hold", "1s", "-heartbeat", "1s", "-transport", "ws,tcp")
	for _, k := range []string{"ws/nanomesh", "ws/baseline", "tcp/nanomesh", "tcp/baseline"} {
		if got := num(t, r, "summary", k, "sessions"); got != 24 {
			t.Errorf("%s: %v sessions, want 24", k, got)
		}
		if got := num(t, r, "summary", k, "failed"); got != 0 {
			t.Errorf("%s: %v failed connects", k, got)
		}
		for _, f := range []string{"connectRate", "rssBeforeKiB", "rssAfterKiB", "goroutines", "heartbeatsPerSec", "loadgenPerConnKiB"} {
			positive(t, k+" "+f, num(t, r, "summary", k, f))
		}
	}
	if nm, bl := num(t, r, "summary", "tcp/nanomesh", "goroutines"), num(t, r, "summary", "tcp/baseline", "goroutines"); bl < 2*24 || nm >= bl {
		t.Errorf("goroutines: nanomesh %v, baseline %v (2 per connection expected for the baseline)", nm, bl)
	}
}

func TestEcho(t *testing.T) {
	r := results(t, runEcho, "echo", []string{"echo-throughput.png", "echo-latency.png"},
		"-c", "3", "-duration", "700ms", "-warmup", "200ms", "-runs", "1", "-modes", "local,cluster")
	sums, _ := r["summary"].([]any)
	if len(sums) != 4 {
		t.Fatalf("%d summary rows, want 4 (2 modes x 2 servers)", len(sums))
	}
	for i := range sums {
		for _, f := range []string{"throughput", "p50Ns", "p99Ns", "serverCpuPercent"} {
			positive(t, fmt.Sprintf("summary[%d].%s", i, f), num(t, sums, i, f))
		}
		if e := num(t, sums, i, "errors") + num(t, sums, i, "timeouts"); e != 0 {
			t.Errorf("summary[%d]: %v errors+timeouts", i, e)
		}
	}
}

func TestBroadcast(t *testing.T) {
	r := results(t, runBroadcast, "broadcast", []string{"broadcast-latency.png"},
		"-m", "6", "-duration", "700ms", "-warmup", "200ms", "-runs", "1", "-senders", "2")
	sums, _ := r["summary"].([]any)
	if len(sums) != 3 {
		t.Fatalf("%d summary rows, want 3 (local nanomesh, local baseline, cross nanomesh)", len(sums))
	}
	for i := range sums {
		for _, f := range []string{"broadcastsPerSec", "pushesPerSec", "deliveryRatio", "p50Ns"} {
			positive(t, fmt.Sprintf("summary[%d].%s", i, f), num(t, sums, i, f))
		}
	}
}

func TestChurn(t *testing.T) {
	r := results(t, runChurn, "churn", nil, "-cycles", "60", "-concurrency", "4", "-runs", "1", "-transport", "tcp,ws")
	for _, k := range []string{"tcp/nanomesh", "tcp/baseline", "ws/nanomesh", "ws/baseline"} {
		if got := num(t, r, "summary", k, "cycles"); got != 60 {
			t.Errorf("%s: %v cycles, want 60", k, got)
		}
		if got := num(t, r, "summary", k, "opened"); got != 60 {
			t.Errorf("%s: server opened %v sessions, want 60", k, got)
		}
		for _, f := range []string{"cyclesPerSec", "p50Ns", "rssBeforeKiB", "rssSettledKiB", "goroutinesSettled"} {
			positive(t, k+" "+f, num(t, r, "summary", k, f))
		}
	}
}

func TestDiscovery(t *testing.T) {
	r := results(t, runDiscovery, "discovery", nil,
		"-backends", "1", "-rounds", "1", "-crashes", "1", "-clients", "4", "-ttl", "2s")
	positive(t, "firstRoutedMs", num(t, r, "registration", 0, "firstRoutedMs"))
	positive(t, "clientOkMs", num(t, r, "registration", 0, "clientOkMs"))
	positive(t, "rolling responses", num(t, r, "rolling", "responses"))
	positive(t, "crash responses", num(t, r, "crashLoad", "responses"))
	positive(t, "gateRemovalMs", num(t, r, "crashes", 0, "gateRemovalMs"))
	if got := num(t, r, "rollingRestarts"); got != 1 {
		t.Errorf("%v rolling restarts, want 1", got)
	}
}
