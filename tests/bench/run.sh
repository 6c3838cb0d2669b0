#!/usr/bin/env bash
# The benchmark command (README "Benchmarks"): services, release build, the Durable Streams
# reference (installed into target/bench-tools, never committed), sessions-bench, and the
# latency-vs-rate picture. Everything runs on this machine's cores, side by side in one run.
#   tests/bench/run.sh [sessions-bench options, e.g. --runs 3 --duration 20]
set -euo pipefail
cd "$(dirname "$0")/../.."

bash deploy/services.sh
cargo build --release -p api -p worker -p tests --bin sessions-api --bin sessions-worker --bin sessions-bench
target/release/sessions-bench --markdown BENCHMARKS.md --json target/bench/latest.json "$@"

# The picture: appends/s against accept latency as the offered rate rises.
venv=target/bench-tools/venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "matplotlib==3.9.2"
fi
"$venv/bin/python" tests/bench/plot.py target/bench/latest.json docs/benchmark-curve.png
