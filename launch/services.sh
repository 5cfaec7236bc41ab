#!/usr/bin/env bash
# Start etcd and nats-server on 127.0.0.1 with their own data dirs; PIDs kept in $STATE_DIR.
#   launch/services.sh start|stop|status
# Env: ETCD_PORT (2379), ETCD_PEER_PORT (2380), NATS_PORT (4222), STATE_DIR (.run/services)
set -euo pipefail
ETCD_PORT=${ETCD_PORT:-2379}
ETCD_PEER_PORT=${ETCD_PEER_PORT:-2380}
NATS_PORT=${NATS_PORT:-4222}
STATE_DIR=${STATE_DIR:-.run/services}
cmd=${1:-start}

start() {
  command -v etcd >/dev/null || { echo "etcd not found: apt-get install -y etcd-server" >&2; exit 1; }
  command -v nats-server >/dev/null || { echo "nats-server not found: apt-get install -y nats-server" >&2; exit 1; }
  mkdir -p "$STATE_DIR"
  if [ -f "$STATE_DIR/etcd.pid" ] && kill -0 "$(cat "$STATE_DIR/etcd.pid")" 2>/dev/null; then
    echo "etcd already running (pid $(cat "$STATE_DIR/etcd.pid"))"
  else
    etcd --name dynamo-lite --data-dir "$STATE_DIR/etcd-data" \
      --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
      --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
      --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
      --initial-cluster "dynamo-lite=http://127.0.0.1:$ETCD_PEER_PORT" >"$STATE_DIR/etcd.log" 2>&1 &
    echo $! >"$STATE_DIR/etcd.pid"
  fi
  if [ -f "$STATE_DIR/nats.pid" ] && kill -0 "$(cat "$STATE_DIR/nats.pid")" 2>/dev/null; then
    echo "nats-server already running (pid $(cat "$STATE_DIR/nats.pid"))"
  else
    nats-server -a 127.0.0.1 -p "$NATS_PORT" >"$STATE_DIR/nats.log" 2>&1 &
    echo $! >"$STATE_DIR/nats.pid"
  fi
  for _ in $(seq 1 50); do
    curl -sf "http://127.0.0.1:$ETCD_PORT/health" | grep -q true && break
    sleep 0.2
  done
  curl -sf "http://127.0.0.1:$ETCD_PORT/health" | grep -q true || { echo "etcd did not come up" >&2; exit 1; }
  echo "etcd:  http://127.0.0.1:$ETCD_PORT (pid $(cat "$STATE_DIR/etcd.pid"))"
  echo "nats:  nats://127.0.0.1:$NATS_PORT (pid $(cat "$STATE_DIR/nats.pid"))"
  echo "export ETCD_ENDPOINTS=127.0.0.1:$ETCD_PORT NATS_SERVER=nats://127.0.0.1:$NATS_PORT"
}

stop() {
  for name in nats etcd; do
    if [ -f "$STATE_DIR/$name.pid" ]; then
      kill "$(cat "$STATE_DIR/$name.pid")" 2>/dev/null || true
      rm -f "$STATE_DIR/$name.pid"
    fi
  done
}

status() {
  for name in etcd nats; do
    if [ -f "$STATE_DIR/$name.pid" ] && kill -0 "$(cat "$STATE_DIR/$name.pid")" 2>/dev/null; then
      echo "$name: running (pid $(cat "$STATE_DIR/$name.pid"))"
    else
      echo "$name: stopped"
    fi
  done
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
