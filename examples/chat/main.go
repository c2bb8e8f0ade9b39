// Command chat is nano's chat demo on nanomesh: a single node serving the
// room component over WebSocket (nano's chat web client works unchanged) and
// TCP, plus its own web page at /web/ on the WebSocket address.
package main

import (
	"context"
	"flag"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/nanomesh/nanomesh/agent"
	"github.com/nanomesh/nanomesh/examples/chat/room"
	"github.com/nanomesh/nanomesh/examples/chat/web"
	"github.com/nanomesh/nanomesh/node"
	"github.com/rs/zerolog"
)

func main() {
	wsAddr := flag.String("ws", ":3250", "WebSocket listen address (also serves the page at /web/)")
	tcpAddr := flag.String("tcp", ":3251", "TCP listen address")
	wsPath := flag.String("wspath", "/nano", "WebSocket path")
	flag.Parse()

	log := zerolog.New(zerolog.ConsoleWriter{Out: os.Stderr, TimeFormat: time.TimeOnly}).With().Timestamp().Logger()
	n := newNode(*wsAddr, *tcpAddr, *wsPath, log)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := n.Start(ctx); err != nil {
		log.Fatal().Err(err).Msg("start")
	}
	log.Info().Msgf("chat page: http://%s/web/", n.WSAddr())
	<-ctx.Done()
	log.Info().Msg("shutting down")
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := n.Shutdown(sctx); err != nil {
		log.Error().Err(err).Msg("shutdown")
		os.Exit(1)
	}
}

// newNode wires the chat node: the room component, the WebSocket and TCP
// listeners, and the page at /web/ on the WebSocket address. The tests start
// it exactly like this.
func newNode(wsAddr, tcpAddr, wsPath string, log zerolog.Logger) *node.Node {
	return node.New(
		node.WithLogger(log),
		node.WithComponent(room.New(), room.Options()...),
		node.WithWSAddr(wsAddr),
		node.WithTCPAddr(tcpAddr),
		node.WithAgent(agent.WithWSPath(wsPath)),
		node.WithHTTP("/web/", http.StripPrefix("/web/", web.Handler(wsPath))),
		node.WithHTTP("/{$}", http.RedirectHandler("/web/", http.StatusFound)),
	)
}
