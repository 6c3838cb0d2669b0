#!/usr/bin/env bash
# THE test command (README, "The two commands"; .ci/run calls exactly this). On a machine with
# only Rust installed it brings up PostgreSQL, Redis and RabbitMQ (deploy/services.sh), installs
# cargo-nextest through cargo if it is missing, then runs the whole suite. Extra arguments go to
# `cargo nextest run` (e.g. `-p tests --test sse`).
#
# Why nextest and not `cargo test`: every test runs in its own process (the suites start servers,
# install a metrics recorder and spawn child processes, which do not share one process well),
# and `.config/nextest.toml` gives slow suites their own timeouts so a hung test cannot stall CI.
set -euo pipefail
cd "$(dirname "$0")/.."

bash deploy/services.sh
# The version the suite is run with here; pinned so that a fresh machine builds one that works
# with this toolchain (Rust 1.95) instead of whatever is newest.
nextest_version=${NEXTEST_VERSION:-0.9.143}
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "test.sh: cargo-nextest is not installed; installing $nextest_version with cargo (once; a few minutes)" >&2
  cargo install cargo-nextest --locked --version "$nextest_version"
fi
exec cargo nextest run --workspace "$@"
