#!/usr/bin/env bash
# Makes PostgreSQL, Redis and RabbitMQ available on 127.0.0.1, idempotently:
#   - a service that answers is left alone;
#   - a service that is installed but stopped is started;
#   - a service that is missing is installed from Debian packages, then started.
# Then it waits until each one answers. It also installs Prometheus (Debian's `prometheus`:
# promtool for deploy/check.sh, and the server tests/tests/prometheus_scrape.rs starts on a port
# of its own) and Caddy (tests/tests/behind_a_proxy.rs) without leaving either service running. Needs root (or passwordless sudo)
# only when it has to install or start something. Safe to run again and again (CI runs it on
# every build).
set -euo pipefail

log() { printf 'services: %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -n "$@"; fi
}

apt_updated=0
install_packages() {
  if [ "$apt_updated" -eq 0 ]; then
    log "apt-get update"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
    apt_updated=1
  fi
  log "installing $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_until() {
  local what=$1 seconds=$2; shift 2
  for _ in $(seq 1 "$seconds"); do
    if "$@" >/dev/null 2>&1; then log "$what is up"; return 0; fi
    sleep 1
  done
  log "$what did not come up within ${seconds}s"; return 1
}

postgres_answers() { psql -h 127.0.0.1 -U postgres -d postgres -Atc 'select 1' >/dev/null 2>&1; }

start_postgres() {
  if postgres_answers; then return 0; fi
  if ! command -v pg_ctlcluster >/dev/null 2>&1 || [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then
    install_packages postgresql postgresql-client
  fi
  local version
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  if ! port_open 5432; then
    log "starting PostgreSQL $version"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  fi
  wait_until "PostgreSQL port" 60 port_open 5432
  if ! postgres_answers; then
    # A fresh Debian cluster uses peer/password auth. The tests connect as postgres over
    # loopback without a password, so trust that one user on loopback (test machines only).
    local hba="/etc/postgresql/$version/main/pg_hba.conf"
    log "allowing passwordless loopback connections for user postgres in $hba"
    as_root sed -i '1i host all postgres 127.0.0.1/32 trust\nhost all postgres ::1/128 trust' "$hba"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main reload
  fi
  wait_until "PostgreSQL" 30 postgres_answers
}

redis_answers() { [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = "PONG" ]; }

start_redis() {
  if command -v redis-cli >/dev/null 2>&1 && redis_answers; then return 0; fi
  if ! command -v redis-server >/dev/null 2>&1; then install_packages redis-server; fi
  if ! port_open 6379; then
    log "starting Redis"
    as_root mkdir -p /var/lib/redis /var/log/redis
    as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
      --appendonly no --dir /var/lib/redis --logfile /var/log/redis/sessions-ci.log
  fi
  wait_until "Redis" 30 redis_answers
}

start_rabbitmq() {
  if port_open 5672; then log "RabbitMQ is up"; return 0; fi
  if ! command -v rabbitmq-server >/dev/null 2>&1; then install_packages rabbitmq-server; fi
  log "starting RabbitMQ"
  as_root rabbitmq-server -detached || true
  as_root timeout 120 rabbitmqctl await_startup >/dev/null 2>&1 || true
  wait_until "RabbitMQ" 120 port_open 5672
}

# Installs a Debian package whose service the tests start themselves, on ports of their own:
# unless something already listened on <port> before, the service the package started is stopped
# again.  install_without_its_service <package> <port> <service>
install_without_its_service() {
  local package="$1" port="$2" service="$3"
  local was_listening=0
  if port_open "$port"; then was_listening=1; fi
  install_packages --no-install-recommends "$package"
  if [ "$was_listening" -eq 0 ]; then
    if [ -d /run/systemd/system ]; then
      as_root systemctl disable --now "$service.service" >/dev/null 2>&1 || true
    else
      as_root "/etc/init.d/$service" stop >/dev/null 2>&1 || true
    fi
  fi
}

# Prometheus: promtool for deploy/check.sh, the server for tests/tests/prometheus_scrape.rs.
install_prometheus() {
  if [ -x /usr/bin/prometheus ] && command -v promtool >/dev/null 2>&1; then return 0; fi
  install_without_its_service prometheus 9090 prometheus
}

# Caddy: tests/tests/behind_a_proxy.rs runs it with deploy/caddy/Caddyfile.
install_caddy() {
  if [ -x /usr/bin/caddy ]; then return 0; fi
  install_without_its_service caddy 80 caddy
}

start_postgres
start_redis
start_rabbitmq
install_prometheus
install_caddy
