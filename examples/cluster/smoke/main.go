// Command smoke checks a running chat cluster through its gate: two users
// join the room, one speaks, both must hear it. deploy/compose-smoke.sh uses
// it against docker compose.
//
//	go run ./examples/cluster/smoke -addr ws://127.0.0.1:3250/nano              # check the chat
//	go run ./examples/cluster/smoke -addr ws://127.0.0.1:3250/nano -room-nodes 2 # first wait for 2 chat nodes
//	go run ./examples/cluster/smoke -addr ws://127.0.0.1:3250/nano -leader      # print the chat node serving the room
//
// The gate's member table is read from GET /cluster on its WebSocket address.
// Every wait is bounded by -timeout; the exit status is 0 on success.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"time"

	"github.com/nanomesh/nanomesh/examples/cluster/internal/check"
)

type table struct {
	Room    string `json:"room"`
	Members []struct {
		ID       string   `json:"id"`
		Services []string `json:"services"`
	} `json:"members"`
}

func (t *table) roomNodes() []string {
	var ids []string
	for _, m := range t.Members {
		for _, s := range m.Services {
			if s == "room" {
				ids = append(ids, m.ID)
			}
		}
	}
	return ids
}

func main() {
	addr := flag.String("addr", "ws://127.0.0.1:3250/nano", "gate address: ws://host:port/path or tcp://host:port")
	httpAddr := flag.String("http", "", "gate HTTP base URL for /cluster (default: from -addr)")
	roomNodes := flag.Int("room-nodes", 0, "first wait until the gate's table has exactly this many chat nodes (0: do not wait)")
	leader := flag.Bool("leader", false, "print the chat node serving the room and exit")
	timeout := flag.Duration("timeout", 60*time.Second, "bound on the whole run")
	flag.Parse()

	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	base := *httpAddr
	if base == "" {
		u, err := url.Parse(*addr)
		if err != nil {
			fail("bad -addr: %v", err)
		}
		base = "http://" + u.Host
	}
	start := time.Now()
	if *leader {
		t, err := poll(ctx, base, func(t *table) bool { return t.Room != "" })
		if err != nil {
			fail("no room node: %v", err)
		}
		fmt.Println(t.Room)
		return
	}
	if *roomNodes > 0 {
		t, err := poll(ctx, base, func(t *table) bool { return len(t.roomNodes()) == *roomNodes })
		if err != nil {
			fail("waiting for %d chat nodes in the gate's table: %v", *roomNodes, err)
		}
		fmt.Printf("smoke: gate table has chat nodes %v (room on %s) after %v\n",
			t.roomNodes(), t.Room, time.Since(start).Round(time.Millisecond))
	}
	r, err := check.Until(ctx, *addr, 5*time.Second, 200*time.Millisecond)
	if err != nil {
		fail("chat check via %s: %v", *addr, err)
	}
	fmt.Printf("smoke: ok: 2 users joined via %s and both got the broadcast in %v (%d tries, %v in all)\n",
		*addr, r.Broadcast.Round(time.Microsecond), r.Attempts, time.Since(start).Round(time.Millisecond))
}

// poll reads the gate's table until ok holds or ctx ends.
func poll(ctx context.Context, base string, ok func(*table) bool) (*table, error) {
	var last error
	for {
		t, err := get(ctx, base)
		if err == nil && ok(t) {
			return t, nil
		}
		if err == nil {
			b, _ := json.Marshal(t)
			err = fmt.Errorf("table: %s", b)
		}
		last = err
		select {
		case <-ctx.Done():
			return nil, last
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func get(ctx context.Context, base string) (*table, error) {
	rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(rctx, http.MethodGet, base+"/cluster", nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET /cluster: %s", resp.Status)
	}
	var t table
	if err := json.NewDecoder(resp.Body).Decode(&t); err != nil {
		return nil, err
	}
	return &t, nil
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "smoke: FAIL: "+format+"\n", args...)
	os.Exit(1)
}
