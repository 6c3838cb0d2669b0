#!/usr/bin/env bash
# Property-based API testing with schemathesis against the committed OpenAPI document, as the
# server serves it (GET /openapi.json).
#
#   bash tests/schemathesis/run.sh
#
# - installs a pinned schemathesis into tests/schemathesis/.venv (ignored by git; PyPI);
# - starts `sessions-api --mode embedded` (SQLite in a temporary data directory, no services)
#   on a free port and reads the development secret key it prints;
# - runs schemathesis twice: with that secret key, then with the public access token of a
#   session created first (read/write on that one session), with the checks
#   `not_a_server_error` and `response_schema_conformance` (a documented status whose body does
#   not match its schema, or a body that is not the documented JSON, fails);
# - exits non-zero when either run reports a failure or an error.
#
# Environment: SESSIONS_API_BINARY (default target/debug/sessions-api, built if missing),
# SCHEMATHESIS_MAX_EXAMPLES (per operation and phase, default 40), SCHEMATHESIS_SEED (default
# fixed, so a failure reproduces), SCHEMATHESIS_MAX_SECONDS (hard bound per run, default 150).
set -euo pipefail

SCHEMATHESIS_VERSION=4.32.5
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="$here/.venv"
max_examples="${SCHEMATHESIS_MAX_EXAMPLES:-40}"
seed="${SCHEMATHESIS_SEED:-20240601}"
max_seconds="${SCHEMATHESIS_MAX_SECONDS:-600}"

log() { printf 'schemathesis: %s\n' "$*" >&2; }

if ! "$venv/bin/schemathesis" --version 2>/dev/null | grep -q "version $SCHEMATHESIS_VERSION\$"; then
  log "installing schemathesis $SCHEMATHESIS_VERSION into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi

binary="${SESSIONS_API_BINARY:-$root/target/debug/sessions-api}"
if [ ! -x "$binary" ]; then
  log "building sessions-api"
  (cd "$root" && cargo build --quiet -p api --bin sessions-api)
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/sessions-schemathesis.XXXXXX")"
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# Embedded mode; no rate limit (the fuzzer's own pace must not turn into 429s); port 0.
env -u DATABASE_URL -u AMQP_URL -u REDIS_URL \
  SESSIONS_DATA_DIR="$work/data" SESSIONS_HTTP_ADDR=127.0.0.1:0 \
  SESSIONS_RATE_LIMIT_PER_SECOND=0 RUST_LOG="${RUST_LOG:-warn}" \
  "$binary" --mode embedded >"$work/stdout" 2>"$work/stderr" &
server_pid=$!

base=""
key=""
for _ in $(seq 1 300); do
  base="$(sed -n 's/.* listening on \(http:\/\/[0-9.:]*\).*/\1/p' "$work/stdout" | head -n 1)"
  key="$(sed -n 's/^secret key: *\(tr_sk_[A-Za-z0-9_]*\).*/\1/p' "$work/stdout" | head -n 1)"
  if [ -n "$base" ] && [ -n "$key" ]; then break; fi
  if ! kill -0 "$server_pid" 2>/dev/null; then
    log "the server exited:"; cat "$work/stderr" >&2; exit 1
  fi
  sleep 0.1
done
if [ -z "$base" ] || [ -z "$key" ]; then
  log "the server did not print its address and key in 30 s"; cat "$work/stderr" >&2; exit 1
fi
log "server at $base"

# A session to hold a public access token for (the second run).
token="$(curl -sS --fail -X POST "$base/api/v1/sessions" -H "Authorization: Bearer $key" \
  -H 'Content-Type: application/json' \
  -d '{"type":"chat.agent","externalId":"schemathesis","taskIdentifier":"agent","triggerConfig":{"basePayload":{}}}' |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["publicAccessToken"])')"

cd "$work" # whatever the tool writes stays in the temporary directory
status=0
run() {
  local label="$1" credential="$2"
  log "run with the $label"
  timeout --kill-after=10 "$max_seconds" \
    "$venv/bin/schemathesis" --config-file "$here/schemathesis.toml" run "$base/openapi.json" \
    --url "$base" \
    --header "Authorization: Bearer $credential" \
    --checks not_a_server_error,response_schema_conformance \
    --max-examples "$max_examples" \
    --seed "$seed" \
    --workers 1 \
    --request-timeout 20 \
    --no-color \
    --suppress-health-check all \
    --output-sanitize true \
    --generation-database none \
    || { log "the run with the $label failed"; status=1; }
}
run "secret key" "$key"
run "session token" "$token"

if grep -q "panicked" "$work/stderr"; then
  log "the server panicked:"; grep -A3 "panicked" "$work/stderr" >&2; status=1
fi
if [ "$status" -ne 0 ]; then
  # What the server logged last (warnings and errors), to explain a failure such as a timeout.
  log "the server's last log lines:"; tail -n 40 "$work/stderr" >&2
fi
exit "$status"
