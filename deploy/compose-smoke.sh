#!/usr/bin/env bash
# Smoke test of docker-compose.yml: builds the images, starts etcd, the gate
# and two chat nodes, chats through the gate (ws://127.0.0.1:3250/nano), then
#   1. SIGKILLs the chat node serving the room: users still chat at once
#      (on the other node) and, after the lease TTL, the gate has dropped it;
#   2. starts it again: it is the newest node, so the room stays put;
#   3. stops the other one gracefully: the room fails over again.
# Exits 0 with "SKIP: ..." when there is no docker engine. Cleans up with
# docker-compose down -v in every case.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! docker info >/dev/null 2>&1; then
	echo "SKIP: no docker engine (docker info failed)"
	exit 0
fi
if command -v docker-compose >/dev/null 2>&1; then
	compose=(docker-compose)
elif docker compose version >/dev/null 2>&1; then
	compose=(docker compose)
else
	echo "SKIP: neither docker-compose nor docker compose is installed"
	exit 0
fi

export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-nanomesh-smoke}
export GATE_WS_PORT=${GATE_WS_PORT:-3250} GATE_TCP_PORT=${GATE_TCP_PORT:-3251}
addr=ws://127.0.0.1:$GATE_WS_PORT/nano

step() { echo "== $(date +%T) $*"; }
since() { echo "$(( ($(date +%s%N) - $1) / 1000000 ))ms"; }

step "building images"
deploy/build-images.sh
tmp=$(mktemp -d)
go build -o "$tmp/smoke" ./examples/cluster/smoke
smoke() { "$tmp/smoke" -addr "$addr" "$@"; }

cleanup() {
	rc=$?
	if [ $rc -ne 0 ]; then
		echo "== FAILED (exit $rc); container logs:"
		"${compose[@]}" logs --no-color --tail=60 || true
	fi
	step "docker-compose down -v"
	"${compose[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
	rm -rf "$tmp"
	exit $rc
}
trap cleanup EXIT

step "docker-compose up -d (project $COMPOSE_PROJECT_NAME)"
"${compose[@]}" up -d

step "waiting for the gate and both chat nodes"
smoke -room-nodes 2 -timeout 120s
if command -v curl >/dev/null 2>&1; then
	curl -fsS -o /dev/null "http://127.0.0.1:$GATE_WS_PORT/web/"
	echo "smoke: page http://127.0.0.1:$GATE_WS_PORT/web/ is served"
fi
leader=$(smoke -leader -timeout 10s)
other=chat-1
[ "$leader" = chat-1 ] && other=chat-2
echo "smoke: the room is on $leader"

step "SIGKILL $leader"
killed=$(date +%s%N)
"${compose[@]}" kill -s SIGKILL "$leader"
echo "smoke: docker-compose kill returned after $(since "$killed") (times below count from its start)"
smoke -timeout 60s
echo "smoke: chatting again $(since "$killed") after the SIGKILL"
step "waiting for the gate to drop $leader (lease TTL 3s)"
smoke -room-nodes 1 -timeout 60s
echo "smoke: $leader left the gate's table $(since "$killed") after the SIGKILL"
[ "$(smoke -leader -timeout 10s)" = "$other" ] || { echo "room not on $other"; exit 1; }

step "starting $leader again: it is the newest, the room stays on $other"
"${compose[@]}" start "$leader"
smoke -room-nodes 2 -timeout 60s
[ "$(smoke -leader -timeout 10s)" = "$other" ] || { echo "room moved away from $other"; exit 1; }

step "stopping $other gracefully (SIGTERM)"
"${compose[@]}" stop "$other"
smoke -room-nodes 1 -timeout 60s
[ "$(smoke -leader -timeout 10s)" = "$leader" ] || { echo "room not on $leader"; exit 1; }
"${compose[@]}" logs --no-color "$other" | grep -q "node stopped" || { echo "$other did not shut down cleanly"; exit 1; }

echo "PASS: compose smoke"
