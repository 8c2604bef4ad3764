#!/usr/bin/env bash
# The trigger-latency run of docs/benchmarks.md: events produced at fixed rates into Kafka
# and over HTTP, latency to the segment change on the changelog topic (hdrhistogram).
#
# Starts the services (tansu on 127.0.0.1, in memory), builds release binaries, runs
# `trigger-latency` and prints a Markdown table. Extra arguments go to trigger-latency,
# e.g. `benches/trigger_latency.sh --rates 10000 --paths kafka --seconds 30`.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/herald-target}"
# tansu in memory, as the published figures were taken (the tests keep its log in
# SQLite: see scripts/services.sh).
export HERALD_TANSU_STORAGE="${HERALD_TANSU_STORAGE:-memory}"
eval "$(scripts/services.sh start)"
cargo build --release --quiet -p herald-engine --bin herald -p herald-benches --bin trigger-latency
BIN="$CARGO_TARGET_DIR/release"
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
exec "$BIN/trigger-latency" --brokers "$HERALD_TEST_KAFKA" --herald "$BIN/herald" "$@"
