// Command bench runs nanomesh's connection-scale and throughput benchmarks,
// each side by side with a goroutine-per-connection baseline, and writes
// markdown tables, JSON and PNG plots to bench/results.
//
//	go run ./bench conns      [flags]  idle heartbeating sessions: memory, connect rate, CPU
//	go run ./bench echo       [flags]  closed-loop request/response, local and gate -> backend
//	go run ./bench broadcast  [flags]  group fan-out, local and across two gates
//	go run ./bench churn      [flags]  connect/handshake/close cycles
//	go run ./bench discovery  [flags]  registration, crash removal, rolling restart
//
// Run "go run ./bench <scenario> -h" for a scenario's flags. Servers and load
// generators run as child processes (re-executions of this binary), so that
// each stays under the per-process open-file limit and is measured alone.
package main

import (
	"fmt"
	"os"
	"sort"

	"github.com/nanomesh/nanomesh/bench/internal/loadgen"
	"github.com/nanomesh/nanomesh/bench/internal/server"
)

type scenario struct {
	run  func(args []string) error
	help string
}

var scenarios = map[string]scenario{
	"conns":     {runConns, "N idle, handshaken, heartbeating sessions (WS and TCP): server RSS per connection, goroutines, connect rate, idle CPU"},
	"echo":      {runEcho, "closed-loop request/response with C clients: throughput and latency, local handler and gate -> backend over gRPC"},
	"broadcast": {runBroadcast, "broadcast to a group of M members, local and split across two gates: pushes delivered/s, delivery latency"},
	"churn":     {runChurn, "connect/handshake/disconnect cycles/s; RSS and goroutines back to baseline afterwards"},
	"discovery": {runDiscovery, "registration -> first routed request, crash -> removal, failed requests during a rolling restart"},
}

func main() {
	if err := dispatch(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

// dispatch runs a scenario or a hidden child subcommand.
func dispatch(args []string) error {
	if len(args) == 0 || args[0] == "-h" || args[0] == "help" || args[0] == "--help" {
		usage()
		return nil
	}
	switch args[0] {
	case loadgen.Sub:
		return loadgen.Main()
	case server.Sub:
		return server.Main()
	}
	sc, ok := scenarios[args[0]]
	if !ok {
		usage()
		return fmt.Errorf("unknown scenario %q", args[0])
	}
	return sc.run(args[1:])
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: go run ./bench <scenario> [flags]\n\nscenarios:")
	names := make([]string, 0, len(scenarios))
	for n := range scenarios {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(os.Stderr, "  %-10s %s\n", n, scenarios[n].help)
	}
}
