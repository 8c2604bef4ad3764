#!/usr/bin/env bash
# The notifications run of docs/benchmarks.md: messages/s per channel against local
# peers, and the latency from a message action to the provider's acceptance.
# Usage: benches/notify_throughput.sh [MESSAGES] [CONCURRENCY]   (defaults: 20000 32)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/herald-target}"
# tansu in memory, as the published figures were taken (the tests keep its log in
# SQLite: see scripts/services.sh).
export HERALD_TANSU_STORAGE="${HERALD_TANSU_STORAGE:-memory}"
eval "$(scripts/services.sh start)"
cargo build --release --quiet -p herald-benches --bin notify-throughput
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
"$CARGO_TARGET_DIR/release/notify-throughput" --messages "${1:-20000}" --concurrency "${2:-32}"
