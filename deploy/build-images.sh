#!/usr/bin/env bash
# Builds the images docker-compose.yml runs, without pulling a Go image:
#
#   nanomesh/cluster:dev            examples/cluster, static, FROM scratch
#   quay.io/coreos/etcd:$ETCD_TAG   the official etcd image if it is already
#                                   here or can be pulled; otherwise etcd built
#                                   from source (deploy/etcd) under that tag
#
# Environment: ETCD_IMAGE (default quay.io/coreos/etcd:v3.7.3, the etcd
# version of go.mod), ETCD_PULL=0 to skip the pull attempt, ETCD_BUILD=1 to
# rebuild the etcd image from source even when the tag exists.
set -euo pipefail
cd "$(dirname "$0")/.."

ETCD_IMAGE=${ETCD_IMAGE:-quay.io/coreos/etcd:v3.7.3}
CLUSTER_IMAGE=${CLUSTER_IMAGE:-nanomesh/cluster:dev}

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/cluster" "$ctx/etcd"

echo "== building $CLUSTER_IMAGE"
CGO_ENABLED=0 GOOS=linux go build -trimpath -ldflags='-s -w' -o "$ctx/cluster/cluster" ./examples/cluster
docker build -q -t "$CLUSTER_IMAGE" -f deploy/Dockerfile "$ctx/cluster"

if [ "${ETCD_BUILD:-0}" != 1 ] && docker image inspect "$ETCD_IMAGE" >/dev/null 2>&1; then
	echo "== $ETCD_IMAGE is present"
	exit 0
fi
if [ "${ETCD_BUILD:-0}" != 1 ] && [ "${ETCD_PULL:-1}" = 1 ] && docker pull -q "$ETCD_IMAGE" >/dev/null 2>&1; then
	echo "== pulled $ETCD_IMAGE"
	exit 0
fi
want=${ETCD_IMAGE##*:v}
have=$(sed -n 's/^[[:space:]]*go.etcd.io\/etcd\/server\/v3 v\([^ ]*\).*/\1/p' deploy/etcd/go.mod)
if [ "$want" != "$have" ]; then
	echo "warning: $ETCD_IMAGE wanted, but deploy/etcd builds etcd $have" >&2
fi
echo "== building $ETCD_IMAGE from source (etcd $have, deploy/etcd)"
(cd deploy/etcd && CGO_ENABLED=0 GOOS=linux go build -trimpath -ldflags='-s -w' -o "$ctx/etcd/etcd" .)
docker build -q -t "$ETCD_IMAGE" -f deploy/etcd/Dockerfile "$ctx/etcd"
