#!/usr/bin/env bash
# Where the CPU goes per append: runs sessions-bench once (release build from tests/bench/run.sh)
# and, during 8 s of its first max window, reads every process's CPU time from /proc; prints
# microseconds of CPU per accepted append and share of one core, per command name (api, worker,
# RabbitMQ's beam.smp, postgres backends together, redis, the load generator itself).
#   tests/bench/profile-cpu.sh [sessions-bench options, e.g. --partitions 16]
# SESSIONS_BENCH=<dir>/sessions-bench profiles the binaries of another build (a before/after
# comparison: the api and worker next to that sessions-bench are the ones measured).
# PROFILE_WINDOW=writer profiles the writer max window instead (per record acknowledged: the
# official writer's path over S2's protocol).
# Also prints, for the same window, how the pipeline batched: commands per broker message (the
# api's group commit), broker messages and commands per worker transaction (from both
# processes' /metrics, found by their listening ports).
set -euo pipefail
cd "$(dirname "$0")/../.."
log=$(mktemp)
cpu_by_command() {
  for stat in /proc/[0-9]*/stat; do
    cat "$stat" 2>/dev/null || true
  done | sed -E 's/^[0-9]+ \((.*)\) [A-Za-z] (.*)$/\1\t\2/' |
    awk -F'\t' '{ split($2, f, " "); cpu[$1] += f[11] + f[12] } END { for (c in cpu) print c "\t" cpu[c] }' |
    sort
}
# `name sum count` of every histogram and counter the two processes export that batching reads.
batching_sample() {
  local process port
  for process in sessions-api sessions-worker; do
    port=$(ss -ltnpH 2>/dev/null | grep "\"$process\"" | awk '{print $4}' | sed 's/.*://' | head -1)
    [ -n "$port" ] || continue
    curl -s "http://127.0.0.1:$port/metrics" || true
  done | awk '
    /^sessions_api_publish_batch_size_(sum|count) / { v[$1] = $2 }
    /^sessions_worker_batch_size_(sum|count) / { v[$1] = $2 }
    /^sessions_worker_commands_total\{/ { v["commands"] += $2 }
    END { for (k in v) print k "\t" v[k] }' | sort
}
accepted() { grep -E '^ +[0-9.]+ s ' "$log" | tail -1 | awk '{print $5}'; }
"${SESSIONS_BENCH:-target/release/sessions-bench}" --runs 1 --duration 12 --skip-references \
  --drain-records 0 --fanout-readers 0 --json target/bench/profile.json "$@" >"$log" 2>&1 &
bench=$!
case "${PROFILE_WINDOW:-max}" in
  writer) window='^== writer max'; unit=record ;;
  *) window='^== max'; unit=append ;;
esac
until grep -q "$window" "$log"; do sleep 0.2; done
sleep 3
before_count=$(accepted); cpu_by_command >"$log.a"; batching_sample >"$log.m1"
sleep 8
after_count=$(accepted); cpu_by_command >"$log.b"; batching_sample >"$log.m2"
wait "$bench"
appends=$((after_count - before_count))
ticks=$(getconf CLK_TCK)
echo "${unit}s acknowledged in the 8 s window: $appends"
join -t $'\t' "$log.a" "$log.b" |
  awk -F'\t' -v n="$appends" -v hz="$ticks" -v unit="$unit" '{ d = $3 - $2; if (d > 0) printf "%-24s %6.1f us/%s %6.1f %% of a core\n", $1, d * 1e6 / hz / n, unit, d * 100 / hz / 8 }' |
  sort -k2 -n -r | head -12
join -t $'\t' "$log.m1" "$log.m2" | awk -F'\t' '{ d[$1] = $3 - $2 }
  END {
    if (d["sessions_api_publish_batch_size_count"] > 0)
      printf "commands per broker message (api)  %6.2f (%d messages)\n", d["sessions_api_publish_batch_size_sum"] / d["sessions_api_publish_batch_size_count"], d["sessions_api_publish_batch_size_count"]
    if (d["sessions_worker_batch_size_count"] > 0)
      printf "messages per worker transaction    %6.2f (%d transactions)\ncommands per worker transaction    %6.2f\n", d["sessions_worker_batch_size_sum"] / d["sessions_worker_batch_size_count"], d["sessions_worker_batch_size_count"], d["commands"] / d["sessions_worker_batch_size_count"]
  }'
rm -f "$log" "$log.a" "$log.b" "$log.m1" "$log.m2"
