package node_test

import (
	"context"
	"fmt"
	"runtime"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nanomesh/nanomesh/client"
	"github.com/nanomesh/nanomesh/node"
	"github.com/nanomesh/nanomesh/session"
)

// raceEnabled reports whether the test binary was built with -race.
func raceEnabled() bool {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return false
	}
	for _, s := range bi.Settings {
		if s.Key == "-race" {
			return s.Value == "true"
		}
	}
	return false
}

// TestConnectionLeak connects, handshakes and disconnects many clients, half
// over TCP and half over WebSocket, and checks that every session, connection
// and goroutine they caused is gone afterwards.
func TestConnectionLeak(t *testing.T) {
	cycles := 10_000
	switch {
	case testing.Short():
		cycles = 2_000
	case raceEnabled():
		cycles = 5_000 // about 5 s alone under -race, but CI runs packages side by side
	}
	const workers = 20

	var opened, closed atomic.Int64
	n := startTestNode(t,
		node.WithComponent(newGame(), gameOpts...),
		node.WithOnSession(func(s *session.Session) {
			opened.Add(1)
			s.OnClose(func(*session.Session) { closed.Add(1) })
		}))
	addrs := []string{transports[0].addr(n), transports[1].addr(n)}

	cycle := func(addr string) error {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		c, err := client.DialRaw(ctx, addr)
		if err != nil {
			return err
		}
		defer c.Close()
		if _, err := c.Handshake(ctx); err != nil {
			return fmt.Errorf("%s: %w", addr, err)
		}
		return nil
	}

	// Warm up (pools, lazily started goroutines), then take the baseline.
	for i := range 2 * workers {
		if err := cycle(addrs[i%2]); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, 10*time.Second, "the warm-up sessions to end", func() bool {
		return n.Agent().Count() == 0 && closed.Load() == opened.Load()
	})
	runtime.GC()
	baseline := runtime.NumGoroutine()
	warm := opened.Load()

	start := time.Now()
	var next atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for range workers {
		wg.Go(func() {
			for {
				i := next.Add(1) - 1
				if i >= int64(cycles) {
					return
				}
				if err := cycle(addrs[i%2]); err != nil {
					errs <- fmt.Errorf("cycle %d: %w", i, err)
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	t.Logf("%d connect/handshake/close cycles in %v", cycles, time.Since(start).Round(time.Millisecond))

	eventually(t, 15*time.Second, "every session and connection to end", func() bool {
		return n.Agent().Sessions() == 0 && n.Agent().Count() == 0
	})
	if got, want := opened.Load()-warm, int64(cycles); got != want {
		t.Errorf("%d sessions established, want %d", got, want)
	}
	eventually(t, 10*time.Second, "every session's OnClose to run", func() bool { return closed.Load() == opened.Load() })
	deadline := time.Now().Add(10 * time.Second)
	for {
		g := runtime.NumGoroutine()
		if g <= baseline+2 {
			break
		}
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			buf = buf[:runtime.Stack(buf, true)]
			t.Fatalf("%d goroutines, baseline %d: leak\n%s", g, baseline, buf)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
