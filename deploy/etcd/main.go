// Command etcd is etcd itself (etcdmain.Main, the code of the official
// binary) built from the Go module cache, for machines that cannot pull the
// official image: deploy/build-images.sh builds it into a FROM scratch image
// under the official tag. It is a module of its own so that the main module
// does not depend on etcd's command-line packages.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
