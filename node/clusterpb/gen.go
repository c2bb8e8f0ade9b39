// Package clusterpb holds the generated gRPC service between nanomesh nodes.
//
// Regenerate after editing cluster.proto (Debian: apt-get install protobuf-compiler;
// go install google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
// google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.6.2):
//
//	go generate ./node/clusterpb
package clusterpb

//go:generate protoc --go_out=. --go_opt=paths=source_relative --go-grpc_out=. --go-grpc_opt=paths=source_relative cluster.proto
