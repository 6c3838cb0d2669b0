#!/usr/bin/env bash
# A local three-node RabbitMQ cluster on this machine, next to (and independent of) the default
# broker on 5672 that deploy/services.sh starts:
#
#   node                    AMQP            Erlang distribution   data and logs
#   sessions-a@localhost    127.0.0.1:5701  25701                 /var/lib/rabbitmq-sessions-cluster/sessions-a
#   sessions-b@localhost    127.0.0.1:5702  25702                 …/sessions-b
#   sessions-c@localhost    127.0.0.1:5703  25703                 …/sessions-c
#
# b and c join a's cluster. Each node has its own config and env files in its folder, so the
# machine's /etc/rabbitmq files (which name the default node and port 5672) are never read.
# The nodes run as the rabbitmq user with HOME=/var/lib/rabbitmq: the same Erlang cookie as the
# default broker, so rabbitmqctl reaches every node. No plugins (management, prometheus).
#
#   deploy/rabbitmq-cluster.sh start            start whatever is not running, join b and c (idempotent)
#   deploy/rabbitmq-cluster.sh stop             stop the three nodes (the default broker is untouched)
#   deploy/rabbitmq-cluster.sh status           cluster status as node a sees it
#   deploy/rabbitmq-cluster.sh reset            stop, then delete the cluster's data folders
#   deploy/rabbitmq-cluster.sh urls             the AMQP_URL list of the three nodes
#   deploy/rabbitmq-cluster.sh ctl NODE ARGS…   rabbitmqctl -n sessions-NODE@localhost ARGS…
#   deploy/rabbitmq-cluster.sh queues NODE ARGS… rabbitmq-queues -n sessions-NODE@localhost ARGS…
#   deploy/rabbitmq-cluster.sh pid NODE         OS pid of the node's Erlang VM (for kill -9)
#
# There is no systemd here: nodes start with `rabbitmq-server -detached`, as deploy/services.sh
# starts the default broker. Needs root (or passwordless sudo).
set -euo pipefail

BASE=/var/lib/rabbitmq-sessions-cluster
NODES=(a b c)
RABBIT_BIN=/usr/lib/rabbitmq/bin
JOIN_LOG=$BASE/join.log

log() { printf 'rabbitmq-cluster: %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -n "$@"; fi
}

node_name() { printf 'sessions-%s@localhost' "$1"; }
node_dir() { printf '%s/sessions-%s' "$BASE" "$1"; }
amqp_port() { case $1 in a) echo 5701 ;; b) echo 5702 ;; c) echo 5703 ;; *) log "unknown node $1"; exit 2 ;; esac; }
dist_port() { echo $(($(amqp_port "$1") + 20000)); }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Runs a RabbitMQ tool as the rabbitmq user, with the node's own env file (never /etc/rabbitmq's).
as_rabbitmq() {
  local node=$1; shift
  local dir
  dir=$(node_dir "$node")
  as_root env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/var/lib/rabbitmq LANG=C.UTF-8 \
    RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf" \
    setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups "$@"
}

ctl() { local node=$1; shift; as_rabbitmq "$node" "$RABBIT_BIN/rabbitmqctl" -n "$(node_name "$node")" "$@"; }
queues() { local node=$1; shift; as_rabbitmq "$node" "$RABBIT_BIN/rabbitmq-queues" -n "$(node_name "$node")" "$@"; }

node_answers() { ctl "$1" -q ping >/dev/null 2>&1; }
app_running() { ctl "$1" -q eval 'rabbit:is_running().' 2>/dev/null | grep -qx true; }

write_files() {
  local node=$1 dir
  dir=$(node_dir "$node")
  as_root mkdir -p "$dir/mnesia" "$dir/log"
  as_root tee "$dir/rabbitmq.conf" >/dev/null <<EOF
listeners.tcp.local = 127.0.0.1:$(amqp_port "$node")
loopback_users.guest = true
EOF
  as_root tee "$dir/rabbitmq-env.conf" >/dev/null <<EOF
NODENAME=$(node_name "$node")
NODE_PORT=$(amqp_port "$node")
DIST_PORT=$(dist_port "$node")
CONFIG_FILE=$dir/rabbitmq.conf
MNESIA_BASE=$dir/mnesia
LOG_BASE=$dir/log
PID_FILE=$dir/beam.pid
ENABLED_PLUGINS_FILE=$dir/enabled_plugins
ERL_EPMD_ADDRESS=127.0.0.1
SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
EOF
  [ -f "$dir/enabled_plugins" ] || echo '[].' | as_root tee "$dir/enabled_plugins" >/dev/null
  as_root chown -R rabbitmq:rabbitmq "$dir"
}

start_node() {
  local node=$1
  if node_answers "$node"; then
    if ! app_running "$node"; then
      log "$(node_name "$node"): VM up, app stopped; start_app"
      ctl "$node" -q start_app
    fi
    return 0
  fi
  write_files "$node"
  log "starting $(node_name "$node") (AMQP $(amqp_port "$node"), distribution $(dist_port "$node"))"
  # The default 1,024 descriptors once made a broker stop answering under test load. Start from
  # / so the node's working directory never depends on the caller's (a node started from a
  # checkout that was later deleted could no longer stop: getcwd failed in rabbit_plugins).
  (cd / && { ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"; } && as_rabbitmq "$node" "$RABBIT_BIN/rabbitmq-server" -detached)
}

await_node() {
  local node=$1
  # await_startup gives up at once while the new VM is not reachable yet (it registers with
  # epmd a few seconds after -detached returns, longer on a busy machine): ask again until 120 s.
  for _ in $(seq 1 24); do
    if ctl "$node" -q --timeout 5 await_startup >/dev/null 2>&1; then return 0; fi
    sleep 5
  done
  log "$(node_name "$node") did not start; see $(node_dir "$node")/log"; return 1
}

in_cluster_of_a() {
  ctl "$1" -q cluster_status --formatter json 2>/dev/null | grep -q "\"$(node_name a)\""
}

cmd_start() {
  as_root mkdir -p "$BASE"
  as_root chown rabbitmq:rabbitmq "$BASE"
  for node in "${NODES[@]}"; do start_node "$node"; done
  for node in "${NODES[@]}"; do await_node "$node"; done
  for node in b c; do
    if ! in_cluster_of_a "$node"; then
      log "joining $(node_name "$node") to $(node_name a)"
      # The CLI prints harmless errors about tracked-connection tables while a node joins.
      {
        ctl "$node" -q stop_app
        ctl "$node" -q reset
        ctl "$node" -q join_cluster "$(node_name a)"
        ctl "$node" -q start_app
      } >>"$JOIN_LOG" 2>&1 || { log "joining failed; see $JOIN_LOG"; return 1; }
      await_node "$node"
    fi
  done
  for node in "${NODES[@]}"; do
    for _ in $(seq 1 60); do port_open "$(amqp_port "$node")" && break; sleep 1; done
    port_open "$(amqp_port "$node")" || { log "port $(amqp_port "$node") not open"; return 1; }
  done
  log "cluster up: $(cmd_urls)"
}

cmd_stop() {
  for node in c b a; do
    if node_answers "$node"; then
      log "stopping $(node_name "$node")"
      ctl "$node" -q stop >/dev/null 2>&1 || true
    fi
    local pid_file
    pid_file="$(node_dir "$node")/beam.pid"
    if as_root test -f "$pid_file"; then
      local pid
      pid=$(as_root cat "$pid_file")
      # A VM that did not stop (or a half-started one) is ended by its own pid only.
      if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "$(node_name "$node")"; then
        for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -0 "$pid" 2>/dev/null && as_root kill -9 "$pid" || true
      fi
    fi
  done
}

cmd_pid() {
  local node=$1 pid_file
  pid_file="$(node_dir "$node")/beam.pid"
  as_root cat "$pid_file"; echo
}

cmd_urls() {
  local urls=()
  for node in "${NODES[@]}"; do
    urls+=("amqp://guest:guest@127.0.0.1:$(amqp_port "$node")/%2f?heartbeat=5")
  done
  (IFS=,; echo "${urls[*]}")
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) ctl a cluster_status ;;
  reset) cmd_stop; log "deleting $BASE"; as_root rm -rf "$BASE" ;;
  urls) cmd_urls ;;
  ctl) shift; ctl "$@" ;;
  queues) shift; queues "$@" ;;
  pid) shift; cmd_pid "$1" ;;
  *) sed -n '2,25p' "$0" >&2; exit 2 ;;
esac
