package main

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nanomesh/nanomesh/bench/internal/server"
	"github.com/nanomesh/nanomesh/client"
	"github.com/nanomesh/nanomesh/discovery/embedded"
)

// etcdOnce starts an embedded etcd in this process on first use.
type etcdOnce struct {
	srv *embedded.Server
}

func (e *etcdOnce) endpoints() ([]string, error) {
	if e.srv == nil {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		srv, err := embedded.Start(ctx)
		if err != nil {
			return nil, err
		}
		e.srv = srv
	}
	return e.srv.Endpoints(), nil
}

func (e *etcdOnce) close() {
	if e.srv != nil {
		_ = e.srv.Close()
		e.srv = nil
	}
}

// topology is a set of server processes serving clients on gates.
type topology struct {
	gates []*srvProc
	all   []*srvProc
}

func (t *topology) stop() {
	for i := len(t.all) - 1; i >= 0; i-- {
		t.all[i].quit()
	}
	t.all, t.gates = nil, nil
}

func (t *topology) kill() {
	for _, s := range t.all {
		s.Kill()
	}
}

// cpuTicks returns the summed CPU ticks of all server processes.
func (t *topology) cpuTicks() int64 {
	var n int64
	for _, s := range t.all {
		n += s.proc().CPUTick
	}
	return n
}

// startTopology starts impl's servers: "local" is one process with the
// handlers; "cluster" is nGates gates and one backend with the handlers.
func (c *common) startTopology(etcd *etcdOnce, impl, mode, transport string, nGates int, hb time.Duration) (*topology, error) {
	t := &topology{}
	listen := func(cfg *server.Config) {
		if transport == "ws" {
			cfg.WS = "0.0.0.0:0"
		} else {
			cfg.TCP = "0.0.0.0:0"
		}
	}
	if mode == "local" {
		cfg := server.Config{Impl: impl, Role: server.RoleSingle, Heartbeat: hb}
		listen(&cfg)
		s, err := c.startServer(impl+"-single", cfg)
		if err != nil {
			return nil, err
		}
		t.gates, t.all = []*srvProc{s}, []*srvProc{s}
		return t, nil
	}
	bcfg := server.Config{Impl: impl, Role: server.RoleBackend, ID: "backend-1", Heartbeat: hb}
	if impl == server.Nanomesh {
		eps, err := etcd.endpoints()
		if err != nil {
			return nil, err
		}
		bcfg.Etcd = eps
	}
	b, err := c.startServer(impl+"-backend", bcfg)
	if err != nil {
		return nil, err
	}
	t.all = append(t.all, b)
	for g := range nGates {
		cfg := server.Config{Impl: impl, Role: server.RoleGate, ID: fmt.Sprintf("gate-%d", g+1), Heartbeat: hb,
			Etcd: bcfg.Etcd, Backend: b.ready.GRPC}
		listen(&cfg)
		s, err := c.startServer(fmt.Sprintf("%s-gate-%d", impl, g+1), cfg)
		if err != nil {
			t.kill()
			return nil, err
		}
		t.gates = append(t.gates, s)
		t.all = append(t.all, s)
	}
	// Wait until every gate routes to the backend.
	for _, g := range t.gates {
		if err := waitRoute(g, transport, "bench.ping", 30*time.Second); err != nil {
			t.kill()
			return nil, err
		}
	}
	return t, nil
}

// clientAddr returns a client URL for the gate.
func clientAddr(g *srvProc, transport string) string {
	if transport == "ws" {
		return "ws://" + targets(g.ready.WS, 1)[0] + "/nano"
	}
	return "tcp://" + targets(g.ready.TCP, 1)[0]
}

// waitRoute requests route on the gate until it succeeds.
func waitRoute(g *srvProc, transport, route string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cl, err := client.Dial(ctx, clientAddr(g, transport))
	if err != nil {
		return err
	}
	defer cl.Close()
	for {
		rctx, rcancel := context.WithTimeout(ctx, 2*time.Second)
		err := cl.Request(rctx, route, nil, nil)
		rcancel()
		if err == nil {
			return nil
		}
		var ce *client.Error
		if !errors.As(err, &ce) && ctx.Err() == nil && !errors.Is(err, context.DeadlineExceeded) {
			return err
		}
		if ctx.Err() != nil {
			return fmt.Errorf("%s: route %s not served after %v: %w", g.Name, route, timeout, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
