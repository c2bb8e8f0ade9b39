package node

import (
	"context"
	"time"
)

// kill stops n abruptly, as a crash would look to its peers: the gRPC server
// drops every connection and the member record disappears, with no draining.
func (n *Node) kill() {
	n.cluster.srv.Stop()
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_ = n.cluster.disc.Close(ctx)
}
